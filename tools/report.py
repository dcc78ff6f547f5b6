"""``vit-report`` (trainer/report.py), kept runnable from a checkout as ``python tools/report.py``."""

import sys

from trainer.report import main

if __name__ == "__main__":
    sys.exit(main())
