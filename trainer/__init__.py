"""The run: config, curriculum, budget, training loop, evaluation, checkpoints, readout and the `vit-train` CLI."""

import time

# Taken before torch, timm and DALI are imported (seconds of a 2-minute budget): the wall clock a user sees
# starts here, and the CLI charges it to the budget.
STARTED_AT = time.monotonic()
