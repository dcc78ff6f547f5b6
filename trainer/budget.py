"""The wall-clock budget: a monotonic clock (injectable for tests), and the one decision to start one more step or
stage (``StopGate``)."""

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

    def can_start(self, seconds: float) -> bool:
        """Is there time for work of ``seconds`` and, after it, the reserved end?"""
        return self.elapsed + seconds + self.reserve_s <= self.seconds


def end_reserve(last_eval_s: float | None, estimated_eval_s: float, checkpoint_s: float = 0.0,
                safety: float = 1.2, margin_s: float = 1.0) -> float:
    """Seconds to keep for the end: the last measured evaluation (else the estimate) and the last measured
    checkpoint write, with a safety factor, plus a margin for the summary and closing the pipelines."""
    eval_s = last_eval_s if last_eval_s is not None else estimated_eval_s
    return (eval_s + checkpoint_s) * safety + margin_s


class StopGate:
    """The one stop decision of a run: is there time for the next step, or for entering the next stage, and after
    it for the reserved end (final evaluation, final checkpoint and weights)?

    It owns what that decision needs: the moving average of a step's wall time at the current stage, the measured
    cost of entering a stage (loader rebuild, checkpoint, warm-up steps and the capture or compile), and the
    measured (or, before any, estimated) cost of an evaluation. A multi-process run makes ``should_continue``
    collective; nothing else needs to change.
    """

    SMOOTHING = 0.1  # weight of the newest step in the moving average
    # A stage entry is estimated from the last one: its settling steps (warm-up, capture, compile) scaled by the
    # tokens per image, its fixed part (rebuild, checkpoint) as it was, with the reserved end's safety factor.
    ENTRY_SAFETY = 1.2

    def __init__(self, budget: Budget, charge_eval: bool = True) -> None:
        self.budget = budget
        self.charge_eval = charge_eval  # False: evaluations are not charged (--budget-counts train), not reserved
        self.step_s: float | None = None  # expected wall time of the next step at this stage
        self.eval_s: float | None = None  # the last evaluation's measured time
        self.eval_estimate_s = 0.0  # before any evaluation: from a probe of the val pipeline and model
        self.checkpoint_s = 0.0  # the last checkpoint's measured write time
        # the end's evaluations against one periodic evaluation (more than 1 when the end also decides the eval
        # size on a held-out slice: trainer.decide.HeldOut.end_cost)
        self.end_factor = 1.0
        self.entry_s: float | None = None  # the last stage entry's measured cost
        self.entry_steps_s = 0.0  # the part of it spent in settling steps (grows with the tokens per image)
        self.entry_tokens = 0
        self._entry_start: float | None = None
        self._steady = False
        self._settle_s = 0.0
        self._update_reserve()

    @property
    def _eval_cost(self) -> float:
        """What an evaluation is expected to charge: the last measured, else the probe's estimate; 0 uncharged."""
        if not self.charge_eval:
            return 0.0
        return self.eval_s if self.eval_s is not None else self.eval_estimate_s

    def _update_reserve(self) -> None:
        # the final checkpoint, and the final weights (model.safetensors, smaller than a checkpoint) after it
        self.budget.reserve_s = end_reserve(self._eval_cost * self.end_factor, 0.0, 2 * self.checkpoint_s)

    @property
    def reserve_s(self) -> float:
        return self.budget.reserve_s

    def record_eval(self, seconds: float) -> None:
        self.eval_s = seconds
        self._update_reserve()

    def estimate_eval(self, seconds: float) -> None:
        self.eval_estimate_s = seconds
        self._update_reserve()

    def scale_end(self, factor: float) -> None:
        """The end's evaluations cost ``factor`` periodic ones (see ``end_factor``)."""
        self.end_factor = factor
        self._update_reserve()

    def record_checkpoint(self, seconds: float) -> None:
        self.checkpoint_s = seconds
        self._update_reserve()

    def entry_estimate(self, tokens: int) -> float | None:
        """Seconds to enter a stage of ``tokens`` patches per image, from the last entry; None before any."""
        if self.entry_s is None:
            return None
        fixed = self.entry_s - self.entry_steps_s  # rebuild, checkpoint: the same at any size
        return self.ENTRY_SAFETY * (fixed + self.entry_steps_s * max(1.0, tokens / max(1, self.entry_tokens)))

    def can_enter_stage(self, tokens: int) -> bool:
        """Is there time to enter a stage (rebuild, warm up, capture) and still end in time? The first stage
        always is: nothing has been measured yet, and a run must train."""
        estimate = self.entry_estimate(tokens)
        return estimate is None or self.budget.can_start(estimate)

    def begin_stage(self, tokens: int) -> None:
        self._entry_start = self.budget.elapsed
        self.entry_tokens = tokens
        self.step_s, self._steady, self._settle_s = None, False, 0.0

    def record_step(self, seconds: float, settling: bool) -> None:
        """A step took ``seconds`` of wall time (data wait included). While the step is ``settling`` (warm-up,
        capture, compile) its time says how long the stage entry takes, not what a step costs; the last such step
        is still the estimate for the next (an upper bound), so a stage's first steps count in the decision."""
        if settling:
            self.step_s = seconds
            self._settle_s += seconds
            return
        if not self._steady:  # the first steady step replaces the settling estimate
            self._steady = True
            self.step_s = seconds
        else:
            assert self.step_s is not None
            self.step_s = (1 - self.SMOOTHING) * self.step_s + self.SMOOTHING * seconds

    def step_changed(self) -> None:
        """The step changed its form mid-stage (a fast path fell back): the next steady step replaces the estimate
        instead of being averaged with the old form's (or with the compile that the change cost)."""
        self._steady = False

    def stage_settled(self) -> None:
        """The step reached its steady form: the stage's entry cost is measured (rebuild to the end of capture)."""
        if self._entry_start is not None:
            self.entry_s = self.budget.elapsed - self._entry_start
            self.entry_steps_s = min(self._settle_s, self.entry_s)
            self._entry_start = None

    def should_continue(self) -> bool:
        """Time for one more step at this stage's pace, and the reserved end after it?"""
        return self.budget.can_start(self.step_s or 0.0)

    def can_evaluate(self) -> bool:
        """Time for a periodic evaluation, then at least one more step, and the reserved end?"""
        return self.budget.can_start(self._eval_cost + (self.step_s or 0.0))
