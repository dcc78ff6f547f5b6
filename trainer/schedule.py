"""Learning-rate schedules as pure functions of the budget fraction spent (or of the epoch, for comparison)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine-time", "linear-time", "constant", "cosine-epochs")


def lr_factor(kind: str, fraction: float, *, epoch: float = 0.0, epochs: int | None = None,
              warmup_fraction: float = 0.0, min_ratio: float = 0.0) -> float:
    """The multiplier on the peak lr, in [min_ratio, 1] after warm-up.

    ``fraction``: share of the budget spent (0..1). Time schedules anneal over the budget, so the lr reaches its
    minimum when the time runs out, not at an epoch count nobody reaches. ``cosine-epochs`` anneals over ``epochs``
    (an epoch-based recipe, for comparison). Warm-up, if any, ramps linearly over the first ``warmup_fraction``.
    """
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup_fraction > 0 and fraction < warmup_fraction:
        return fraction / warmup_fraction
    if kind == "constant":
        return 1.0
    if kind == "cosine-epochs":
        if not epochs:
            raise ValueError("cosine-epochs needs a number of epochs")
        progress = min(epoch / epochs, 1.0)
    else:
        progress = (fraction - warmup_fraction) / (1.0 - warmup_fraction) if warmup_fraction < 1 else 1.0
    if kind in ("cosine-time", "cosine-epochs"):
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear-time":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    return min_ratio + (1.0 - min_ratio) * shape
