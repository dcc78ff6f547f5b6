"""The learning rate: every term of it in ``lr_at``, the schedules as pure functions of the budget fraction spent
(or of the epoch, for comparison)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import TrainConfig

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


def batch_rule_lr(lr: float, global_batch: int) -> float:
    """DeiT's rule: ``lr`` is the rate for 512 images per step, scaled linearly to the global batch."""
    return lr * global_batch / 512


def stage_lr(base_lr: float, batch: int, base_batch: int) -> float:
    """Square-root scaling with the batch size, the usual rule for Adam-family optimizers (linear scaling at 16x
    the batch diverges a ViT)."""
    return base_lr * math.sqrt(batch / base_batch)


def peak_lr(cfg: TrainConfig, batch: int) -> float:
    """A stage's peak lr: the batch rule on the run's global batch (``cfg.peak_lr``), then the square-root rule for
    a stage whose batch ``--stage-batch tokens`` grew from ``--batch-size``."""
    return stage_lr(cfg.peak_lr, batch, cfg.batch_size)


def lr_at(cfg: TrainConfig, batch: int, fraction: float, train_from: float = 0.0, epoch: float = 0.0) -> float:
    """The learning rate of a step at a stage of per-process ``batch``, ``fraction`` of the budget spent. Its terms:

    1. the batch rule: ``--lr`` is for 512 images, scaled to the global batch (``batch_rule_lr``);
    2. the stage rule: times sqrt(stage batch / ``--batch-size``) (``stage_lr``);
    3. the schedule's clock: the budget from the first training step on (``train_from``, the share spent before
       it: imports, indexing, the first pipeline build), so start-up does not eat the warm-up;
    4. the warm-up: linear over ``--warmup`` of that clock, then the schedule (``lr_factor``), which anneals over
       the budget (or over ``--epochs`` for cosine-epochs, read at ``epoch``);
    5. the floor: ``--min-lr``, as a share of the stage's peak (never above it).
    """
    peak = peak_lr(cfg, batch)
    clock = (fraction - train_from) / (1.0 - train_from)
    return peak * lr_factor(cfg.lr_schedule, clock, epoch=epoch, epochs=cfg.epochs,
                            warmup_fraction=cfg.warmup_fraction, min_ratio=min(1.0, cfg.min_lr / peak))
