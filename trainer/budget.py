"""The wall-clock budget: a monotonic clock (injectable for tests) and the decision to start one more step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Budget:
    """Seconds allowed for the run: what earlier attempts spent plus what ``clock`` measures since construction.

    ``reserve_s`` is kept back for what must happen after the last step (the final evaluation, the summary):
    ``can_start`` refuses a step that would eat into it.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, spent_before: float = 0.0,
                 start: float | None = None) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock() if start is None else start
        self.spent_before = spent_before  # charged by earlier attempts of the same run (resume)
        self.reserve_s = 0.0
        self.uncharged_s = 0.0  # time spent in uncharged() blocks

    @contextmanager
    def uncharged(self, really: bool = True) -> Iterator[None]:
        """Time inside is not charged to the budget (evaluation, when only training time counts)."""
        start = self.clock()
        try:
            yield
        finally:
            if really:
                self.uncharged_s += self.clock() - start

    @property
    def elapsed(self) -> float:
        return self.spent_before + self.clock() - self.start - self.uncharged_s

    @property
    def remaining(self) -> float:
        return self.seconds - self.elapsed

    @property
    def fraction(self) -> float:
        return min(1.0, self.elapsed / self.seconds)

    def can_fit(self, seconds: float) -> bool:
        """Is there time left for work expected to take ``seconds``?"""
        return self.elapsed + seconds <= self.seconds

    def can_start(self, seconds: float) -> bool:
        """Is there time for work of ``seconds`` and, after it, the reserved end?"""
        return self.elapsed + seconds + self.reserve_s <= self.seconds


def end_reserve(last_eval_s: float | None, estimated_eval_s: float, checkpoint_s: float = 0.0,
                safety: float = 1.2, margin_s: float = 1.0) -> float:
    """Seconds to keep for the end: the last measured evaluation (else the estimate) and the last measured
    checkpoint write, with a safety factor, plus a margin for the summary and closing the pipelines."""
    eval_s = last_eval_s if last_eval_s is not None else estimated_eval_s
    return (eval_s + checkpoint_s) * safety + margin_s
