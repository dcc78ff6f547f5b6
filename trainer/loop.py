"""The training loop: a ``Trainer`` whose ``run`` reads top to bottom — per epoch, enter the stage the plan asks
for, step until the epoch ends or the ranks agree to stop, evaluate — then the final evaluation and files.

Everything else is a component the loop calls in one line: the stop gate (``trainer.budget``), the data-parallel
agreement (``trainer.agreement``), the learning rate (``trainer.schedule.lr_at``), the reports
(``trainer.metrics``), the evaluations (``trainer.evaluate``), the checkpoints (``trainer.checkpointer``), the
fast paths' fallbacks (``trainer.fastpath``) and the decisions made on a held-out slice (``trainer.decide``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from model.flops import train_flops
from pipelines import Split, StageLoader, StageSpec
from trainer.agreement import NEXT_STAGE, STOP_BUDGET, STOP_DIVERGED, STOP_SIGNAL, Agreement
from trainer.budget import Budget, StopGate
from trainer.checkpointer import Checkpointer
from trainer.config import TrainConfig
from trainer.data import EVAL_BATCH, stage_batch, stage_spec
from trainer.decide import decide_eval_size, hold_out
from trainer.dist import World
from trainer.evaluate import Evaluator
from trainer.fastpath import RunPaths
from trainer.hardware import peak_flops
from trainer.metrics import MetricsProcessor
from trainer.readout import Readout
from trainer.rundir import RunDir, save_safetensors_atomic
from trainer.schedule import lr_at, peak_lr
from trainer.step import Diverged, TrainStep, resolve_amp, resolve_device, resolve_step_mode

__all__ = ["Diverged", "StopFlag", "StopRequested", "TrainState", "Trainer", "train"]


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0
    images_seen: int = 0
    epoch_step: int = 0  # steps done in the current epoch
    epoch_progress: float = 0.0  # fraction of the current epoch done when the run stopped
    attempt: int = 0  # 0 for the first process of the run, +1 per resume
    stage: int = -1
    image_size: int = 0
    batch_size: int = 0
    peak_lr: float = 0.0  # the stage's lr before the schedule's factor
    lr: float = 0.0
    # The share of the budget spent when the first training step ran (-1: not yet). The lr schedule (warm-up, then
    # its decay) spans the budget from there, so start-up (imports, indexing, the first pipeline build, the eval
    # probe) does not eat the warm-up.
    train_from: float = -1.0


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint has been written."""

    def __init__(self, reason: str, checkpoint: Path) -> None:
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


@dataclass
class StopFlag:
    """Set from a signal handler, read by the step loop between steps."""

    reason: str | None = None


class Trainer:
    """One run: the model's ``TrainStep``, the loaders, the state a checkpoint holds, and the components.

    ``loader`` builds the train and val loaders (``StageLoader``; tests and benchmarks pass a synthetic one with the
    same interface). Every time it reads comes from the budget's clock, so a test's fake clock drives it all.
    Data-parallel, every rank runs this same loop in lockstep; rank 0's gate decides, the others follow (the
    agreement), and only rank 0 writes (the others get a RunDir and Readout that write nothing).
    """

    def __init__(self, cfg: TrainConfig, train_split: Split, val_split: Split, run: RunDir, readout: Readout,
                 budget: Budget, resume: dict[str, Any] | None = None, stop: StopFlag | None = None,
                 loader: Callable[..., StageLoader] = StageLoader, world: World | None = None) -> None:
        self.world = world = world or World()
        if cfg.world_size != world.world_size:  # the lr rule reads the global batch
            cfg = replace(cfg, world_size=world.world_size)
        self.cfg, self.run_dir, self.readout, self.budget, self.clock = cfg, run, readout, budget, budget.clock
        self.held = hold_out(cfg, train_split)  # the slice the end's decisions are made on, never trained on
        self.train_split = train_split = self.held.train
        self.val_split, self.stop, self.loader = val_split, stop or StopFlag(), loader
        self.plan = cfg.plan()
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and world.distributed:
            self.device = torch.device("cuda", world.local_rank)
        self.amp = resolve_amp(cfg.amp, self.device)
        mode, self.mode_note = resolve_step_mode(cfg.step, self.device, self.amp, world.distributed)
        # a checkpoint from before train_from existed: its schedule ran over the whole budget
        self.state = s = TrainState(**{"train_from": 0.0, **resume["state"]}) if resume else TrainState()
        s.attempt += 1 if resume else 0
        torch.manual_seed(cfg.seed + s.attempt)  # the same on every rank: the same initial weights and EMA copy
        self.step = TrainStep.for_config(cfg, len(train_split.classes), self.device,
                                         image_size=s.image_size or self.plan.start, mode=mode, ddp=world.distributed)
        self.net = self.step.net
        self.evaluated = self.step.ema.module if self.step.ema is not None else self.net  # what --ema evaluates
        self.gate = StopGate(budget, charge_eval=cfg.budget_counts == "all")
        self.paths = RunPaths(cfg, mode, [self.net, *([self.evaluated] if self.evaluated is not self.net else [])],
                              self.plan.patch, self.amp or torch.float32, log=run.log, say=readout.warn,
                              where=lambda: {"step": s.step, "stage": s.stage, "image_size": s.image_size,
                                             "elapsed_s": round(budget.elapsed, 3)})
        self.step.on_fallback = self.paths.step_fell_back
        self.checkpointer = Checkpointer(cfg, self.step, s, run, budget, self.gate, world)
        if resume:
            self.checkpointer.load(resume)
            self.checkpointer.restart_epoch_on_new_world(resume, readout)
        if world.rank:  # from here each rank draws its own drop-path masks and batch augmentations
            torch.manual_seed(world.seed(cfg.seed + s.attempt))
        self.step.steps = s.step
        self.train_batches = loader(train_split, self.spec(s.image_size or self.plan.start,
                                                           s.batch_size or cfg.batch_size), train=True,
                                    device=self.device, on_fallback=self.paths.decoder_fell_back("train"))
        val_batches = loader(val_split, self.spec(cfg.final_eval_size, EVAL_BATCH, train=False), train=False,
                             device=self.device, on_fallback=self.paths.decoder_fell_back("evaluation"))
        self.metrics = MetricsProcessor(cfg, run, readout, budget, self.plan, len(train_split), self.device,
                                        peak_flops(self.device), world.world_size, s.images_seen)
        self.evaluator = Evaluator(self.evaluated, val_batches, self.amp, budget, self.gate, cfg, run,
                                   readout, world, last_s=resume.get("last_eval_s") if resume else None)
        self.gate.scale_end(self.held.end_cost(cfg.image_size, self.plan.patch, len(val_split)))
        self.agreement = Agreement(world, budget, self.gate, cfg.log_every_s, diverged=self.step.diverged,
                                   settling=lambda: self.step.settling, step=s.step)
        self.params = sum(p.numel() for p in self.net.parameters())
        self.train_flops = train_flops(self.net, s.image_size) if s.image_size else 0.0
        self.loss: torch.Tensor | None = None
        self.stages_closed = False  # a stage could not be entered in time: the run stays at its current size
        self.pass_cut = False  # the last pass ended early, at a time-placed stage change
        self._t_prev = budget.elapsed
        if resume:  # a resumed run enters no stage: its first steps settle the step all the same
            self.gate.begin_stage(self.plan.tokens(s.image_size))

    # -- the run, top to bottom ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.announce()
        if self.paths.running["ffn"]:  # the evaluation probe runs it first: checked at the evaluation's shapes
            self.paths.check_ffn(self.cfg.final_eval_size, 2)
        if self.state.stage >= 0:  # resumed mid-stage: the fast paths are checked here, as at an entry
            self.paths.enter_stage(self.state.stage, self.state.image_size, self.state.batch_size, self.decoder)
        self.evaluator.probe()
        while True:
            if self.agreed(self.stage_due()):
                self.enter_stage()
            if not self.run_epoch():
                break  # out of time mid-epoch
            self.end_epoch()
            if not self.agreed(self.gate.should_continue()):
                break
        return self.finish()

    def target_stage(self) -> int:
        """The stage the plan asks for now: by completed epochs, or by the share of the budget spent."""
        if self.plan.timed:
            return self.plan.stage_at_fraction(self.budget.fraction)
        return self.plan.stage_at(self.state.epoch)

    def stage_due(self) -> bool:
        return not self.stages_closed and self.target_stage() > self.state.stage

    def enter_stage(self) -> bool:
        """Stage change at an epoch boundary: new size and batch, position embedding and optimizer state resized,
        the loader rebuilt (the old pipeline freed), the step re-prepared (a captured graph is recaptured), the
        fast paths checked, a checkpoint. A stage whose entry cannot fit in what is left is not entered: the run
        goes on at its size."""
        s = self.state
        target = int(self.world.rank0(self.target_stage()))
        size = self.plan.size_of(target)
        if s.stage >= 0 and not self.agreed(self.gate.can_enter_stage(self.plan.tokens(size))):
            return self.close_stages(target, size)
        start = self.clock()
        self.gate.begin_stage(self.plan.tokens(size))
        s.stage, s.image_size = target, size
        s.batch_size = stage_batch(self.cfg, size, len(self.train_split))
        s.peak_lr = peak_lr(self.cfg, s.batch_size)  # the schedule scales it step by step
        self.step.move_to(size)  # the captured graph dropped, the position embedding and its Adam moments resized
        self.train_batches.set_stage(self.spec(size, s.batch_size))
        self.paths.enter_stage(s.stage, size, s.batch_size, self.decoder)
        rebuild_s = self.clock() - start
        self.train_flops = train_flops(self.net, size)
        fields = dict(step=s.step, stage=s.stage, epoch=s.epoch, image_size=size, batch_size=s.batch_size,
                      peak_lr=s.peak_lr, steps_per_epoch=len(self.train_batches), rebuild_s=round(rebuild_s, 4),
                      step_mode=self.mode, fused_ffn=self.paths.running["ffn"], decoder=self.decoder,
                      source_px=getattr(self.train_batches, "source_px", None),
                      elapsed_s=round(self.budget.elapsed, 3))
        self.metrics.emit("stage", **fields)
        if self.readout.live:
            source = f", reading the {fields['source_px']}-px copy" if fields["source_px"] else ""
            self.readout.message(f"stage {s.stage}: {size} px, batch {s.batch_size}{source}, "
                                 f"rebuilt in {rebuild_s:.2f}s")
        self.checkpointer.save(self.evaluator.last_s)
        return True

    def close_stages(self, target: int, size: int) -> bool:
        """The next stage's entry does not fit in what is left: no later stage is entered."""
        self.stages_closed = True
        estimate = self.gate.entry_estimate(self.plan.tokens(size)) or 0.0
        self.run_dir.log("stage_skipped", stage=target, image_size=size, entry_estimate_s=round(estimate, 3),
                         remaining_s=round(self.budget.remaining, 3), elapsed_s=round(self.budget.elapsed, 3))
        self.readout.message(f"stage {target} ({size} px) not entered: entering it takes ~{estimate:.1f}s and "
                             f"{self.budget.remaining:.1f}s are left; training on at {self.state.image_size} px")
        return False

    def run_epoch(self) -> bool:
        """Steps until the epoch ends (True) or the ranks agree there is no time for another (False)."""
        s = self.state
        # a whole epoch ends with the loader's own end (a sharded reader drains its padding there); a resumed one
        # after the steps it had left
        steps = len(self.train_batches)
        stop_at = steps if s.epoch_step else math.inf
        self._t_prev = self.budget.elapsed
        fetch_start = self.clock()
        for images, labels in self.train_batches:
            self.metrics.wait_s += self.clock() - fetch_start
            if self.agreement.due(s.step):
                verdict = self.agreement.verdict(s.step, self.stop.reason, self.stage_due_mid_epoch,
                                                 self.plan.next_start(s.stage))
                if verdict == STOP_DIVERGED:
                    raise Diverged(f"the loss became non-finite by step {s.step}")
                if verdict == STOP_SIGNAL:
                    assert self.agreement.stop_signal is not None
                    raise StopRequested(self.agreement.stop_signal, self.checkpointer.save(self.evaluator.last_s))
                if verdict == STOP_BUDGET:
                    s.epoch_progress = s.epoch_step / steps
                    return False
                if verdict == NEXT_STAGE:
                    self.pass_cut = True  # a time-placed stage begins mid-epoch: this pass ends, the next afresh
                    break
            self.train_step(images, labels)
            if self.agreement.synced and self.world.is_main:  # data-parallel: non-finite losses seen at syncs
                self.metrics.maybe_log(s, self.loss, self.train_flops,
                                       None if self.world.distributed else self.step.check_finite)
                self.checkpointer.maybe_save(self.evaluator.last_s)
            if s.epoch_step >= stop_at:  # a resumed epoch ends after its remaining steps, its reader mid-epoch:
                self.train_batches.close()  # the next epoch starts from a fresh pipeline
                break
            fetch_start = self.clock()
        s.epoch, s.epoch_step, s.epoch_progress = s.epoch + 1, 0, 0.0
        return True

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        s = self.state
        fraction = self.agreement.fraction(s.step)
        if s.train_from < 0:
            s.train_from = min(fraction, 0.5)
        s.lr = lr_at(self.cfg, s.batch_size, fraction, s.train_from,
                     epoch=s.epoch + s.epoch_step / len(self.train_batches))
        settling = self.step.settling
        self.loss = self.step(images, labels, lr=s.lr)
        if not settling and self.step.times.steps == 1:  # the step fell back mid-stage: its new mode settled here
            settling = True
            self.gate.step_changed()
        if settling and not self.step.settling:
            self.step.synchronize()  # once per stage: the entry's cost is measured to its end, not to its launch
        s.step, s.epoch_step = s.step + 1, s.epoch_step + 1
        s.images_seen += labels.shape[0] * self.world.world_size  # every rank steps on a full batch of its shard
        now = self.budget.elapsed
        self.gate.record_step(now - self._t_prev, settling=settling)
        self._t_prev = now
        if settling and not self.step.settling:
            self.gate.stage_settled()
            self.run_dir.log("stage_ready", stage=s.stage, image_size=s.image_size, step_mode=self.mode,
                             entry_s=round(self.gate.entry_s or 0.0, 3), settle_steps=self.step.times.steps,
                             capture_s=round(self.step.times.capture_s, 4), elapsed_s=round(now, 3))

    def end_epoch(self) -> None:
        """The periodic evaluation, after whole epochs only (not after a pass cut short by a stage change)."""
        cut, self.pass_cut = self.pass_cut, False
        self.evaluator.last = None
        if (not cut and self.cfg.eval_every and self.state.epoch % self.cfg.eval_every == 0
                and self.agreed(self.gate.can_evaluate())):
            self.evaluator(self.state)

    def finish(self) -> dict[str, Any]:
        """The final evaluation (unless the last epoch's is current), the final checkpoint and weights."""
        s = self.state
        train_s = self.budget.elapsed
        self.train_batches.close()
        size, decision = final_eval_size(self)
        last = self.evaluator.final(s, size)
        self.evaluator.batches.close()
        final_checkpoint = self.checkpointer.save(self.evaluator.last_s)
        if self.world.is_main:
            save_safetensors_atomic(self.evaluated.state_dict(), self.run_dir.path / "model.safetensors")
        return summary(self, last, train_s, final_checkpoint, decision)

    # -- pieces ----------------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The step mode running now (the one resolved from --step, or what it fell back to)."""
        return self.paths.running["step"]

    @property
    def decoder(self) -> str | None:
        return getattr(self.train_batches, "decoder", None)

    def agreed(self, verdict: bool) -> bool:
        return self.agreement.agreed(verdict)

    def stage_due_mid_epoch(self) -> bool:
        """A time-placed stage begins now, in the middle of a pass that has begun."""
        return self.plan.timed and bool(self.state.epoch_step) and self.stage_due()

    def spec(self, size: int, batch: int, train: bool = True) -> StageSpec:  # a new shuffle order per attempt
        return stage_spec(self.cfg, self.device, size, batch, seed=self.cfg.seed + self.state.attempt, train=train,
                          world=self.world)

    def announce(self) -> None:
        if self.mode_note:  # an explicit --step that cannot run here: loud, or under --strict-fast-paths, the end
            self.paths.cannot_run(self.mode_note)
        self.metrics.announce(net=self.net, params=self.params, amp=self.amp, step_mode=self.mode,
                              fused_ffn=self.paths.running["ffn"], attempt=self.state.attempt,
                              train=self.train_split, val=self.val_split, holdout=self.held.record())


def final_eval_size(t: Trainer) -> tuple[int, dict[str, Any]]:
    """The final evaluation's size: --eval-size, or the best on the held-out slice (``trainer.decide``), as an
    ``eval_size`` event."""
    held, size = t.held, t.state.image_size
    batches = held.slice and t.loader(held.slice, t.spec(size, EVAL_BATCH, train=False), train=False,
                                      device=t.device, on_fallback=t.paths.decoder_fell_back("holdout"))
    try:
        size, record = decide_eval_size(t.cfg, held, size, t.plan.patch, t.evaluator.measure_on(batches))
    finally:
        if batches:
            batches.close()
    t.run_dir.log("eval_size", **record, elapsed_s=round(t.budget.elapsed, 3))
    if held.slice is not None:
        t.readout.message(f"eval size {size} px: {record['why']}")
    return size, record


def summary(t: Trainer, last: dict[str, Any], train_s: float, checkpoint: Path,
            decision: dict[str, Any]) -> dict[str, Any]:
    """summary.json of a run that reached the end of its budget: the final evaluation, what was trained, what ran."""
    s, cfg, elapsed = t.state, t.cfg, t.budget.elapsed
    return {
        "top1": last["top1"], "top5": last["top5"],
        # passes over the data: a pass cut short by a time-placed stage change counts for what it read
        "epochs": round(s.images_seen / len(t.train_split), 4), "steps": s.step, "images_seen": s.images_seen,
        "elapsed_s": round(elapsed, 3), "train_s": round(train_s, 3), "budget_s": cfg.budget_s,
        "overshoot_s": round(elapsed - cfg.budget_s, 3), "stop_reason": "budget", "model": cfg.model,
        # the size the run trained at last, and the one it was evaluated at (decided how, and on what)
        "image_size": s.image_size, "eval_size": t.evaluator.size, "stages_reached": s.stage + 1,
        "decisions": {"holdout": t.held.record(), "eval_size": decision},
        "stages_skipped": t.stages_closed, "params": t.params, "step_mode": t.mode,
        "fused_ffn": t.paths.running["ffn"], "decoder": t.decoder,
        # what ran at each stage this process entered, and every fast path that fell back (and why)
        "stages": t.paths.stages, "fallbacks": t.paths.events,
        "attempts": s.attempt + 1, "checkpoint": str(checkpoint.relative_to(t.run_dir.path)),
        "device": str(t.device), "world_size": t.world.world_size, "global_batch": cfg.global_batch,
        "state": asdict(s),
    }


def train(cfg: TrainConfig, train_split: Split, val_split: Split, run: RunDir, readout: Readout,
          budget: Budget, resume: dict[str, Any] | None = None, stop: StopFlag | None = None,
          loader: Callable[..., StageLoader] = StageLoader, world: World | None = None) -> dict[str, Any]:
    """Train until the budget ends; returns the summary."""
    return Trainer(cfg, train_split, val_split, run, readout, budget, resume=resume, stop=stop, loader=loader,
                   world=world).run()
