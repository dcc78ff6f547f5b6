"""`python -m trainer` is `vit-train`."""

import sys

from trainer.cli import run

sys.exit(run())
