"""`python -m trainer` is `vit-train`."""

import sys

from trainer.cli import main

sys.exit(main())
