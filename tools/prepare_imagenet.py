"""``vit-prepare`` (pipelines/prepare.py), kept runnable from a checkout as ``python tools/prepare_imagenet.py``."""

import sys

from pipelines.prepare import main

if __name__ == "__main__":
    sys.exit(main())
