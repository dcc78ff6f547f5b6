"""Between steps, what every rank does next: go on, end the pass for a time-placed stage, or stop (the budget, a
signal, a non-finite loss), and the budget clock every rank's lr schedule reads.

One process asks its own stop gate before every step. Data-parallel ranks ask together at steps rank 0 schedules
(about one per metrics interval, every step near the end and while a stage settles) and take the schedule's clock
from rank 0's, extrapolated by its step time in between, so every rank steps with the same lr.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable

from trainer.budget import Budget, StopGate
from trainer.dist import World

# The verdict between steps, all-reduced with MAX at agreed steps so every rank does the same at the same step: the
# larger wins (a non-finite loss over a signal over the budget over a time-placed stage change).
CONTINUE, NEXT_STAGE, STOP_BUDGET, STOP_SIGNAL, STOP_DIVERGED = 0, 1, 2, 3, 4


class Agreement:
    """The verdicts and the shared clock of one run. ``diverged()`` reads the step's non-finite flag (a host
    sync); ``settling()`` says whether the step is still settling at its stage."""

    def __init__(self, world: World, budget: Budget, gate: StopGate, log_every_s: float, *,
                 diverged: Callable[[], bool], settling: Callable[[], bool], step: int = 0) -> None:
        self.world, self.budget, self.gate, self.log_every_s = world, budget, gate, log_every_s
        self.diverged, self.settling = diverged, settling
        self.next_sync = step
        self.synced = False  # the step about to run (or just run) followed a sync
        self.shared_clock = (budget.elapsed, 0.0, step)  # rank 0's (elapsed, step time, step) at the last sync
        self.stop_signal: str | None = None

    def due(self, step: int) -> bool:
        """Is ``step`` one where the ranks sync (every step in one process)?"""
        self.synced = step >= self.next_sync
        return self.synced

    def verdict(self, step: int, signal_name: str | None, stage_due: Callable[[], bool],
                next_stage: float | None) -> int:
        """Before ``step``: stop (a non-finite loss, a signal, the budget), end the pass for a time-placed stage
        (``stage_due()``), or go on. One process asks its own gate (no device sync: non-finite losses are caught at
        metrics lines). Data-parallel, every rank asks here at the same step: any rank's signal or non-finite loss
        stops all, rank 0's gate decides the rest, and rank 0 names the step of the next sync (before
        ``next_stage``, the budget fraction at which the next time-placed stage begins) and shares its clock."""
        signum = signal.Signals[signal_name].value if signal_name else 0
        if self.world.distributed and self.diverged():  # a host sync, once per sync
            verdict = STOP_DIVERGED
        elif signum:
            verdict = STOP_SIGNAL
        elif not self.world.is_main:  # the questions of time are rank 0's to answer
            verdict = CONTINUE
        elif not self.gate.should_continue():
            verdict = STOP_BUDGET
        elif stage_due():
            verdict = NEXT_STAGE
        else:
            verdict = CONTINUE
        if not self.world.distributed:
            self.next_sync = step + 1
            self.stop_signal = signal_name
            return verdict
        (verdict, signum), (elapsed, step_s, next_in) = self.world.agree(
            (verdict, signum), (self.budget.elapsed, self.gate.step_s or 0.0, self.steps_to_next_sync(next_stage)))
        self.shared_clock = (elapsed, step_s, step)
        self.next_sync = step + int(next_in)
        self.stop_signal = signal.Signals(signum).name if signum else None
        return verdict

    def steps_to_next_sync(self, next_stage: float | None) -> int:
        """Rank 0: steps until the ranks next sync — a metrics interval's worth, at most half of the steps that
        still fit before the reserved end (so the last syncs come closer together), at most until the next
        time-placed stage begins; every step while the step is settling (its time not yet known)."""
        step_s = self.gate.step_s
        if self.settling() or not step_s:
            return 1
        fit = (self.budget.remaining - self.budget.reserve_s) / step_s
        steps = min(math.ceil(self.log_every_s / step_s), fit / 2)
        if next_stage is not None:
            steps = min(steps, (next_stage * self.budget.seconds - self.budget.elapsed) / step_s)
        return max(1, int(steps))

    def agreed(self, verdict: bool) -> bool:
        """Rank 0's verdict on a question of time (evaluate now? enter the next stage?), shared by every rank."""
        return bool(self.world.rank0(verdict))

    def fraction(self, step: int) -> float:
        """The share of the budget spent, as the lr schedule reads it: this process's clock, or data-parallel, rank
        0's at the last sync extrapolated by its step time (the same number on every rank)."""
        if not self.world.distributed:
            return self.budget.fraction
        elapsed, step_s, at = self.shared_clock
        return min(1.0, (elapsed + (step - at) * step_s) / self.budget.seconds)
