"""The wall-clock budget: a monotonic clock (injectable for tests) and the decision to start one more step."""

from __future__ import annotations

import time
from collections.abc import Callable


class Budget:
    """Seconds allowed for the run, measured from construction on ``clock``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def remaining(self) -> float:
        return self.seconds - self.elapsed

    @property
    def fraction(self) -> float:
        return min(1.0, self.elapsed / self.seconds)

    def can_fit(self, seconds: float) -> bool:
        """Is there time left for work expected to take ``seconds``?"""
        return self.elapsed + seconds <= self.seconds
