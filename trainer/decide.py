"""What a run decides by itself from the data, and on what: a slice held out from the training split, never ``val/``
(the user's test set).

One decision today: the final evaluation's image size. A model trained with random-resized crops sees objects
larger than a centre crop at the same size shows them, so it often scores best a little above its training size
(Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). Without ``--eval-size``, the run holds out
``--holdout`` of the training images (stratified by class, the same slice on every rank and every resume), never
trains on them, and at the end evaluates the final model on them at the training size and one, two and four
patches above; the val split is then evaluated once, at the size the slice preferred. The training size is kept
unless another beats it by at least ``MIN_GAIN_IMAGES`` of the slice's images, so noise does not move it.

A slice under ``HOLDOUT_MIN`` images cannot tell sizes a point apart (one image is 0.4 points of 250), so a split
too small for one (fewer than HOLDOUT_MIN / share images: 5,000 at the default 5%) is trained on whole and evaluated
at the training size; so is a budget under ``HOLDOUT_MIN_BUDGET_S`` (the end's evaluations, reserved from the start,
are about five val passes: a large share of a budget of minutes), and so are WebDataset shards (their members are
read by the tar, not by a file list). Every choice, and why, goes to the ``start`` event, the ``eval_size`` event
at the end and ``summary.json``. The rule reads the configuration and the split only, so every rank and every
resume of a run holds out the same files.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipelines import Split
from trainer.config import TrainConfig

HOLDOUT_MIN = 250  # images: fewer cannot tell two sizes a point apart
HOLDOUT_MAX = 2000  # images: enough to see half a point; ImageNet loses 0.16% of its training split
# The end's evaluations (the slice at four sizes, val at up to 4x the tokens) are reserved from the start: about 5
# val passes. A budget of minutes (a first try, a CPU run) would give a large share of itself to them.
HOLDOUT_MIN_BUDGET_S = 3600.0
EVAL_STEPS = (0, 1, 2, 4)  # candidates: the training size plus this many patches
MIN_GAIN_IMAGES = 2  # another size must beat the training size by this many held-out images


@dataclass(frozen=True)
class HeldOut:
    """The training split cut in two: what the run trains on, and the slice its decisions are made on (or None,
    and why not)."""

    train: Split
    slice: Split | None
    why: str

    def record(self) -> dict[str, Any]:
        """What the start event and summary.json say of it."""
        return {"images": len(self.slice) if self.slice is not None else 0, "why": self.why}

    def end_cost(self, train_size: int, patch: int, val_images: int) -> float:
        """The end's evaluations against one val evaluation at the training size: with a slice, the slice at every
        candidate size, then val at the largest (the worst case), each in proportion to its tokens per image."""
        if self.slice is None:
            return 1.0
        ratios = [(size / train_size) ** 2 for size in candidates(train_size, patch)]
        return max(ratios) + len(self.slice) / max(1, val_images) * sum(ratios)


def hold_out(cfg: TrainConfig, split: Split) -> HeldOut:
    """The slice for the run's decisions: ``--holdout`` of ``split`` (at most HOLDOUT_MAX images), taken class by
    class in proportion, chosen by ``--seed`` alone (so a resume, or another rank, holds out the same files)."""
    if cfg.eval_size is not None:
        return HeldOut(split, None, f"--eval-size {cfg.eval_size} given: nothing to decide, nothing held out")
    if not cfg.holdout:
        return HeldOut(split, None, "--holdout 0: evaluating at the training size")
    if cfg.budget_s < HOLDOUT_MIN_BUDGET_S:
        return HeldOut(split, None, f"a budget under {HOLDOUT_MIN_BUDGET_S / 3600:g}h: the end's extra evaluations "
                                    f"would take a large share of it; evaluating at the training size")
    if split.shards:
        return HeldOut(split, None, "WebDataset shards: no slice is held out; evaluating at the training size")
    want = min(HOLDOUT_MAX, round(cfg.holdout * len(split)))
    if want < HOLDOUT_MIN:
        return HeldOut(split, None, f"{len(split)} training images: a {cfg.holdout:.0%} slice would be {want} "
                                    f"images, under the {HOLDOUT_MIN} that tell sizes a point apart; evaluating at "
                                    f"the training size")
    rng = random.Random(f"holdout:{cfg.seed}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(split.labels):
        by_class.setdefault(label, []).append(i)
    held: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        # every class in proportion, at least one from a class with two or more (so its other images still train)
        take = max(int(len(members) > 1), round(want * len(members) / len(split)))
        held.extend(members[:take])
    held.sort()
    chosen = set(held)
    train, sliced = (_subset(split, [i for i in range(len(split)) if i not in chosen]), _subset(split, held))
    return HeldOut(train, sliced, f"{len(sliced)} of {len(split)} training images held out (--holdout "
                                  f"{cfg.holdout:g}, by class), never trained on: the final evaluation's size is "
                                  f"chosen on them")


def _subset(split: Split, indices: list[int]) -> Split:
    return replace(split, files=tuple(split.files[i] for i in indices), labels=tuple(split.labels[i] for i in indices))


def candidates(train_size: int, patch: int) -> list[int]:
    return [train_size + k * patch for k in EVAL_STEPS]


def choose(scores: dict[int, float], train_size: int, images: int) -> tuple[int, str]:
    """The size to evaluate at from the slice's top-1 at each candidate: the best, if it beats the training size by
    at least MIN_GAIN_IMAGES images of the slice, else the training size; and why."""
    best = max(scores, key=lambda size: (scores[size], -size))
    gain = round((scores[best] - scores[train_size]) * images)
    if best != train_size and gain >= MIN_GAIN_IMAGES:
        return best, (f"{best} px scored {gain} more of {images} held-out images than the training size "
                      f"{train_size} px")
    return train_size, (f"no size beat the training size {train_size} px by {MIN_GAIN_IMAGES}+ of {images} held-out "
                        f"images")


def decide_eval_size(cfg: TrainConfig, held: HeldOut, train_size: int, patch: int,
                     measure: Callable[[int], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The final evaluation's size, and the ``eval_size`` record: ``measure(size)`` evaluates the final model on the
    held-out slice at ``size`` (``train_size``: the size the run ended at). Without a slice, ``--eval-size`` if
    given, else ``--image-size``."""
    if held.slice is None:
        return cfg.final_eval_size, {"chosen": cfg.final_eval_size, "why": held.why}
    scores = {size: measure(size)["top1"] for size in candidates(train_size, patch)}
    size, why = choose(scores, train_size, len(held.slice))
    return size, {"chosen": size, "train_size": train_size, "images": len(held.slice),
                  "holdout_top1": {str(k): round(v, 5) for k, v in scores.items()}, "why": why}
