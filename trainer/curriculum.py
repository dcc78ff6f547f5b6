"""The image-size curriculum: which image size (and batch size) each epoch — or each moment of the budget — trains
at. Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property


class PlanError(ValueError):
    """The curriculum cannot be built; the message is one line naming the flag."""


@dataclass(frozen=True)
class Stage:
    index: int
    first_epoch: int | None  # None in the time form
    last_epoch: int | None  # None: runs until the budget ends (and in the time form)
    image_size: int
    tokens: int  # patch tokens per image
    starts_at: float | None = None  # the time form: the fraction of the budget at which the stage begins


@dataclass(frozen=True)
class CurriculumPlan:
    """``start`` px, ``step`` px more per stage, never above ``final``; a stage lasts ``every`` epochs (the paper's
    epoch form ``S:M:N``), or, in the time form ``S:M@P%``, the final size begins when the fraction ``until`` of the
    budget is spent and the stages before it share that time (``starts``)."""

    start: int
    step: int
    every: int | None
    final: int
    patch: int = 16
    until: float | None = None

    def tokens(self, size: int) -> int:
        """Patches per image at ``size`` px."""
        return (size // self.patch) ** 2

    def __post_init__(self) -> None:
        flag = "--curriculum"
        if self.step <= 0:
            raise PlanError(f"{flag}: the size step M must be positive, got {self.step}")
        if self.until is None and (self.every is None or self.every <= 0):
            raise PlanError(f"{flag}: the epochs per stage N must be positive, got {self.every}")
        if self.until is not None and not 0 < self.until < 1:
            raise PlanError(f"{flag}: the final size must begin within the budget, at a share in (0%, 100%), "
                            f"got {100 * self.until:g}%")
        if self.start <= 0 or self.start > self.final:
            raise PlanError(f"{flag}: the start size {self.start} must lie in (0, --image-size {self.final}]")
        for name, value in (("start size", self.start), ("size step", self.step), ("final size", self.final)):
            if value % self.patch:
                raise PlanError(f"{flag}: the {name} {value} is not a multiple of the patch size {self.patch}")

    @classmethod
    def fixed(cls, size: int, patch: int = 16) -> CurriculumPlan:
        """No curriculum: the final size from the first epoch (the paper's "Ours*")."""
        return cls(start=size, step=patch, every=1, final=size, patch=patch)

    @classmethod
    def parse(cls, text: str, final: int, patch: int = 16) -> CurriculumPlan:
        """'S:M:N' (e.g. the paper's best, '32:32:5'), or 'S:M@P%' (e.g. '32:32@60%': the final size from 60% of
        the budget on), with the final size F from --image-size."""
        every: int | None = None
        until: float | None = None
        try:
            if "@" in text:
                sizes, _, share = text.partition("@")
                start, step = (int(part) for part in sizes.split(":"))
                until = float(share.strip().removesuffix("%")) / 100
            else:
                start, step, every = (int(part) for part in text.split(":"))
        except ValueError:
            raise PlanError(f"--curriculum: expected START:STEP:EPOCHS such as 32:32:5, or START:STEP@SHARE such as "
                            f"32:32@60%, got {text!r}") from None
        return cls(start=start, step=step, every=every, final=final, patch=patch, until=until)

    @property
    def timed(self) -> bool:
        return self.until is not None

    @property
    def num_stages(self) -> int:
        return 1 + math.ceil((self.final - self.start) / self.step)

    def size_of(self, stage: int) -> int:
        return min(self.final, self.start + self.step * stage)

    def stage_at(self, epoch: int) -> int:
        """The epoch form's stage at ``epoch``."""
        if self.every is None:
            raise PlanError("a time-placed curriculum has no stage per epoch; use stage_at_fraction")
        return min(epoch // self.every, self.num_stages - 1)

    @cached_property  # read at every step of a time-placed run: computed once
    def starts(self) -> tuple[float, ...]:
        """The time form: the budget fraction at which each stage begins (the final one at ``until``).

        The stages before the final share [0, until] in proportion to their image side, an estimate of a small
        image's cost: a 32-px image costs 1/49 of a 224-px one in FLOPs, but only about 1/4-1/5 of its time per
        image (measured: CPU, and an H100's captured step), so each stage gets roughly the same number of epochs,
        as in the paper's epoch form.
        """
        if self.until is None:
            raise PlanError("the epoch form has no time starts")
        sides = [self.size_of(k) for k in range(self.num_stages - 1)]
        total, out, spent = sum(sides), [], 0.0
        for side in sides:
            out.append(self.until * spent / total)
            spent += side
        return (*out, self.until) if sides else (0.0,)

    def next_start(self, stage: int) -> float | None:
        """The budget fraction at which the stage after ``stage`` begins: None in the epoch form or at the last."""
        if not self.timed or stage + 1 >= self.num_stages:
            return None
        return self.starts[stage + 1]

    def stage_at_fraction(self, fraction: float) -> int:
        """The time form's stage once ``fraction`` of the budget is spent."""
        return max(k for k, start in enumerate(self.starts) if start <= fraction)

    def stages(self) -> list[Stage]:
        out = []
        for i in range(self.num_stages):
            size = self.size_of(i)
            if self.until is not None:
                out.append(Stage(i, None, None, size, (size // self.patch) ** 2, starts_at=round(self.starts[i], 6)))
                continue
            assert self.every is not None
            last = None if i == self.num_stages - 1 else (i + 1) * self.every - 1
            out.append(Stage(i, i * self.every, last, size, (size // self.patch) ** 2))
        return out


def stage_batch_size(base: int, size: int, final: int, rule: str, max_batch: int) -> int:
    """'fixed': the base batch at every size. 'tokens': about as many tokens per batch as the base batch at the
    final size, i.e. base * (final / size)^2, capped at ``max_batch`` and rounded down to a multiple of 8."""
    if rule == "fixed" or size >= final:
        return base
    scaled = min(max_batch, int(base * (final / size) ** 2))
    return max(base, scaled // 8 * 8)
