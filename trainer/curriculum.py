"""The image-size curriculum: which image size (and batch size) each epoch trains at. Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass


class PlanError(ValueError):
    """The curriculum cannot be built; the message is one line naming the flag."""


@dataclass(frozen=True)
class Stage:
    index: int
    first_epoch: int
    last_epoch: int | None  # None: runs until the budget ends
    image_size: int
    tokens: int  # patch tokens per image


@dataclass(frozen=True)
class CurriculumPlan:
    """The paper's linear rule: ``start`` px, ``step`` px more every ``every`` epochs, never above ``final``."""

    start: int
    step: int
    every: int
    final: int
    patch: int = 16

    def __post_init__(self) -> None:
        flag = "--curriculum"
        if self.step <= 0:
            raise PlanError(f"{flag}: the size step M must be positive, got {self.step}")
        if self.every <= 0:
            raise PlanError(f"{flag}: the epochs per stage N must be positive, got {self.every}")
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
        """'S:M:N' (e.g. the paper's best, '32:32:5') with the final size F from --image-size."""
        try:
            start, step, every = (int(part) for part in text.split(":"))
        except ValueError:
            raise PlanError(f"--curriculum: expected START:STEP:EPOCHS such as 32:32:5, got {text!r}") from None
        return cls(start=start, step=step, every=every, final=final, patch=patch)

    def stage_at(self, epoch: int) -> int:
        return min(epoch // self.every, self.num_stages - 1)

    def size_at(self, epoch: int) -> int:
        return min(self.final, self.start + self.step * (epoch // self.every))

    @property
    def num_stages(self) -> int:
        return 1 + math.ceil((self.final - self.start) / self.step)

    def stages(self) -> list[Stage]:
        out = []
        for i in range(self.num_stages):
            last = None if i == self.num_stages - 1 else (i + 1) * self.every - 1
            size = self.size_at(i * self.every)
            out.append(Stage(i, i * self.every, last, size, (size // self.patch) ** 2))
        return out


def stage_batch_size(base: int, size: int, final: int, rule: str, max_batch: int) -> int:
    """'fixed': the base batch at every size. 'tokens': about as many tokens per batch as the base batch at the
    final size, i.e. base * (final / size)^2, capped at ``max_batch`` and rounded down to a multiple of 8."""
    if rule == "fixed" or size >= final:
        return base
    scaled = min(max_batch, int(base * (final / size) ** 2))
    return max(base, scaled // 8 * 8)


def stage_lr(base_lr: float, batch: int, base_batch: int) -> float:
    """Square-root scaling with the batch size, the usual rule for Adam-family optimizers (linear scaling at 16x
    the batch diverges a ViT)."""
    return base_lr * math.sqrt(batch / base_batch)
