"""The loop's checkpoints: what a checkpoint holds, when one is due, writing it (rank 0) and loading it back.

The file format, rotation and resume discovery are ``trainer.checkpoint``'s; this component decides when and what.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.budget import Budget, StopGate
from trainer.checkpoint import rng_state, save_checkpoint, set_rng_state
from trainer.config import TrainConfig
from trainer.dist import World
from trainer.rundir import RunDir
from trainer.step import TrainStep, load_optimizer_state, optimizer_state_dict


class Checkpointer:
    """Checkpoints of one run: at each stage entry, every ``--ckpt-every`` in between, at a signal and at the end.

    ``state`` is the loop's ``TrainState`` (read when saving, restored by ``load``). Rank 0 writes: every rank
    holds the same weights and optimizer state. The write's measured time goes to the stop gate, which reserves
    it for the end."""

    def __init__(self, cfg: TrainConfig, step: TrainStep, state: Any, run_dir: RunDir, budget: Budget,
                 gate: StopGate, world: World) -> None:
        self.cfg, self.step, self.state, self.run_dir = cfg, step, state, run_dir
        self.budget, self.gate, self.world = budget, gate, world
        self.last_t = budget.elapsed  # when the last checkpoint was written (or the run began)

    def maybe_save(self, last_eval_s: float | None) -> None:
        """A checkpoint if ``--ckpt-every`` has passed since the last one."""
        if self.budget.elapsed - self.last_t >= self.cfg.ckpt_every_s:
            self.save(last_eval_s)

    def save(self, last_eval_s: float | None) -> Path:
        """Write one now (rank 0; the others return at once); a non-finite loss since the last check raises
        ``Diverged`` instead, so the last good checkpoint stays the newest."""
        folder = self.run_dir.path / "checkpoints"
        if not self.world.is_main:
            return folder
        start = self.budget.clock()
        if not self.world.distributed:  # data-parallel: every rank checks at a sync
            self.step.check_finite(self.state.step)
        path = save_checkpoint(folder, self.state.step, self.payload(last_eval_s))
        write_s = self.budget.clock() - start
        self.gate.record_checkpoint(write_s)
        self.run_dir.log("checkpoint", step=self.state.step, path=str(path.relative_to(self.run_dir.path)),
                         write_s=round(write_s, 3), elapsed_s=round(self.budget.elapsed, 3))
        self.last_t = self.budget.elapsed
        return path

    def payload(self, last_eval_s: float | None) -> dict[str, Any]:
        """What a checkpoint holds (loaded with ``weights_only=True``): the same whatever the step mode."""
        step = self.step
        payload = {"model": step.net.state_dict(), "optimizer": optimizer_state_dict(step.optimizer),
                   "scaler": step.scaler.state_dict(), "rng": rng_state(), "state": asdict(self.state),
                   "budget_spent_s": self.budget.elapsed, "last_eval_s": last_eval_s,
                   "config": asdict(self.cfg), "format": 1}
        if step.ema is not None:
            payload["ema"] = step.ema.module.state_dict()
        return payload

    def restart_epoch_on_new_world(self, payload: dict[str, Any], readout: Any) -> None:
        """A checkpoint written by another number of processes: the epoch's shards and steps differ, so the data
        position restarts at the beginning of the epoch it was in (the budget and the schedule carry over)."""
        s = self.state
        before = payload.get("config", {}).get("world_size", 1)
        if before == self.world.world_size or not s.epoch_step:
            return
        readout.message(f"resuming on {self.world.world_size} process(es) from a checkpoint of {before}: epoch "
                        f"{s.epoch} restarts from its beginning ({s.epoch_step} steps of it were done)")
        self.run_dir.log("resume_world", world_size=self.world.world_size, checkpoint_world_size=before,
                         epoch=s.epoch, epoch_steps_dropped=s.epoch_step)
        s.epoch_step, s.epoch_progress = 0, 0.0

    def load(self, payload: dict[str, Any]) -> None:
        """The weights, optimizer and scaler state, random state and EMA copy of a checkpoint, into this run's step
        (whatever step mode either ran: a run captured on a GPU resumes eagerly on the CPU and back)."""
        step = self.step
        step.net.load_state_dict(payload["model"])
        load_optimizer_state(step.optimizer, payload["optimizer"])
        step.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        if step.ema is not None:
            step.ema.module.load_state_dict(payload["ema"])
