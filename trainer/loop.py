"""The training loop: a ``Trainer`` whose ``run`` reads top to bottom — per epoch, enter the stage the plan asks
for, step until the epoch ends or the ``StopGate`` says stop, evaluate — then the final evaluation and files."""

from __future__ import annotations

import functools
import itertools
import math
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from model.flops import forward_flops
from pipelines import Split, StageLoader, StageSpec
from trainer.budget import Budget, StopGate
from trainer.checkpoint import rng_state, save_checkpoint, set_rng_state
from trainer.config import TrainConfig
from trainer.curriculum import CurriculumPlan, stage_batch_size, stage_lr
from trainer.dist import CONTINUE, NEXT_STAGE, STOP_BUDGET, STOP_DIVERGED, STOP_SIGNAL, World
from trainer.evaluate import evaluate
from trainer.fastpath import FastPathError, FastPaths
from trainer.hardware import peak_flops
from trainer.readout import Readout
from trainer.rundir import RunDir, save_safetensors_atomic
from trainer.schedule import lr_factor
from trainer.step import (
    TrainStep,
    load_optimizer_state,
    optimizer_state_dict,
    resolve_amp,
    resolve_device,
    resolve_step_mode,
)

EVAL_BATCH = 128
PROBE_BATCHES = 3  # val batches timed at the start, to reserve the final evaluation before any was measured


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


def stage_spec(cfg: TrainConfig, device: torch.device, image_size: int, batch_size: int,
               seed: int | None = None, train: bool = True, world: World | None = None) -> StageSpec:
    """The pipeline for a stage. Data-parallel (``world``): this rank's shard of the split (by global rank, so
    every node reads its own), its own augmentation seed, and the shuffle seed every rank shares."""
    world = world or World()
    seed = cfg.seed if seed is None else seed
    return StageSpec.on(device, decoder=cfg.decoder, image_size=image_size, batch_size=batch_size,
                        num_threads=cfg.workers, seed=world.seed(seed), shuffle_seed=seed, shard_id=world.rank,
                        num_shards=world.world_size, interp="cubic" if cfg.interp == "bicubic" else "linear",
                        rand_augment=randaug_bins(cfg) if train else None, min_area=cfg.min_area,
                        source_ratio=cfg.source_ratio, handoff=cfg.data_handoff)


def randaug_bins(cfg: TrainConfig) -> tuple[int, int] | None:
    """timm's magnitude (0..10) on DALI's 31 bins (0..30): m9 -> 27."""
    return (cfg.randaug_n, round(cfg.randaug * 3)) if cfg.randaug else None


def device_memory(device: torch.device) -> dict[str, float]:
    """GiB allocated now and at peak by PyTorch on the device (host-side counters: no sync)."""
    if device.type != "cuda":
        return {}
    return {"mem_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "mem_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def plan_lines(plan: CurriculumPlan, cfg: TrainConfig, train_images: int) -> list[str]:
    """The plan as printed at start: per stage its epochs (epoch form) or the moment of the budget it begins."""
    when = "begins at" if plan.timed else "epochs"
    lines = [f"{'stage':>5} {when:>16} {'size':>5} {'tokens':>6} {'batch':>5}"]
    for s in plan.stages():
        if s.starts_at is not None:
            at = s.starts_at * cfg.budget_s
            span = f"{100 * s.starts_at:.1f}% ({at / 3600:.2f}h)" if at >= 3600 else f"{100 * s.starts_at:.1f}% " \
                   f"({at:.0f}s)"
        else:
            span = f"{s.first_epoch}-{s.last_epoch}" if s.last_epoch is not None else f"{s.first_epoch}+"
        batch = stage_batch_size(cfg.batch_size, s.image_size, plan.final, cfg.stage_batch,
                                 min(cfg.max_batch, train_images))
        lines.append(f"{s.index:>5} {span:>16} {s.image_size:>5} {s.tokens:>6} {batch:>5}")
    return lines


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint has been written."""

    def __init__(self, reason: str, checkpoint: Path) -> None:
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


class Diverged(RuntimeError):
    """The loss became non-finite (and no fp16 grad scaler is there to skip the step)."""


@dataclass
class StopFlag:
    """Set from a signal handler, read by the step loop between steps."""

    reason: str | None = None


class Trainer:
    """One run: the model's ``TrainStep``, the loaders, the ``StopGate``, and the state a checkpoint holds.

    ``loader`` builds the train and val loaders (``StageLoader``; tests and benchmarks pass a synthetic one with the
    same interface). Every time it reads comes from the budget's clock, so a test's fake clock drives it all.
    """

    def __init__(self, cfg: TrainConfig, train_split: Split, val_split: Split, run: RunDir, readout: Readout,
                 budget: Budget, resume: dict[str, Any] | None = None, stop: StopFlag | None = None,
                 loader: Callable[..., StageLoader] = StageLoader, world: World | None = None) -> None:
        # Data-parallel: every rank runs this same loop in lockstep; rank 0's gate decides, the others follow
        # (see ``sync``), and only rank 0 writes (the others get a RunDir and Readout that write nothing).
        self.world = world or World()
        if cfg.world_size != self.world.world_size:  # the lr rule reads the global batch
            cfg = replace(cfg, world_size=self.world.world_size)
        self.cfg, self.run_dir, self.readout, self.budget = cfg, run, readout, budget
        self.train_split, self.val_split = train_split, val_split
        self.stop = stop or StopFlag()
        self.clock = budget.clock
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.mode, self.mode_note = resolve_step_mode(cfg.step, self.device, self.amp, self.world.distributed)
        self.plan = cfg.plan()
        self.warmup_fraction = cfg.warmup_fraction  # parsed once, read at every step
        # a checkpoint from before train_from existed: its schedule ran over the whole budget
        self.state = TrainState(**{"train_from": 0.0, **resume["state"]}) if resume else TrainState()
        if resume:
            self.state.attempt += 1
        base_seed = cfg.seed + self.state.attempt
        torch.manual_seed(base_seed)  # the same on every rank: the same initial weights and EMA copy

        s = self.state
        self.step = TrainStep.for_config(cfg, len(train_split.classes), self.device,
                                         image_size=s.image_size or self.plan.start, mode=self.mode,
                                         ddp=self.world.distributed)
        self.net = self.step.net
        # what each fast path runs now, and its fallbacks (one line, a ``fallback`` event; --strict-fast-paths: stop)
        self.paths = FastPaths(
            asked={"step": cfg.step, "ffn": cfg.fused_ffn, "decoder": cfg.decoder},
            running={"step": self.mode, "ffn": any(getattr(m, "fused", False) for m in self.net.modules()),
                     "decoder": None},
            strict=cfg.strict_fast_paths, log=run.log, say=readout.warn,
            where=lambda: {"step": self.state.step, "stage": self.state.stage,
                           "image_size": self.state.image_size, "elapsed_s": round(self.budget.elapsed, 3)})
        self.step.on_fallback = self.step_fell_back
        self.ran: list[dict[str, Any]] = []  # per stage entered by this process: what ran there
        self.last_eval_s: float | None = resume.get("last_eval_s") if resume else None
        if resume:
            self.load_state_dict(resume)
            self.restart_epoch_on_new_world(resume)
        if self.world.rank:  # from here each rank draws its own drop-path masks and batch augmentations
            torch.manual_seed(self.world.seed(base_seed))
        self.step.steps = s.step
        # with --ema, the averaged weights are what is evaluated and kept
        self.evaluated = self.step.ema.module if self.step.ema is not None else self.net
        # the measured evaluation, its counts summed over ranks; tests swap in one that ticks a fake clock
        self.evaluate_model = functools.partial(evaluate, world=self.world)

        self.gate = StopGate(budget, charge_eval=cfg.budget_counts == "all")
        if self.last_eval_s is not None:
            self.gate.record_eval(self.last_eval_s)
        self.train_batches = loader(train_split, self.spec(s.image_size or self.plan.start,
                                                           s.batch_size or cfg.batch_size), train=True,
                                    device=self.device, on_fallback=self.decoder_fell_back("train"))
        self.val_batches = loader(val_split, self.spec(cfg.final_eval_size, EVAL_BATCH, train=False), train=False,
                                  device=self.device, on_fallback=self.decoder_fell_back("evaluation"))
        self.params = sum(p.numel() for p in self.net.parameters())
        self.peak = peak_flops(self.device)
        self.train_flops = 3.0 * forward_flops(self.net, s.image_size) if s.image_size else 0.0
        self.loss: torch.Tensor | None = None
        self.last_eval: dict[str, float] | None = None
        self.stages_closed = False  # a stage could not be entered in time: the run stays at its current size
        self._projected: set[int] = set()  # stages whose time-placed plan was projected into epochs
        self.pass_cut = False  # the last pass ended early, at a time-placed stage change
        self.wait_s = 0.0  # time the loop waited on the loader since the last metrics line
        self.last_log_t, self.last_log_images = budget.elapsed, s.images_seen
        self.last_ckpt_t = budget.elapsed
        self._t_prev = budget.elapsed
        # Between steps the loop asks ``sync`` whether to go on. One process asks its own gate before every step;
        # data-parallel ranks ask together at steps rank 0 schedules (about one per metrics interval, every step
        # near the end) and take the lr schedule's clock from rank 0's, extrapolated by its step time in between.
        self.next_sync = s.step
        self.synced = False  # the step about to run (or just run) followed a sync
        self.shared_clock = (budget.elapsed, 0.0, s.step)  # rank 0's (elapsed, step time, step) at the last sync
        self.stop_signal: str | None = None
        if resume:  # a resumed run enters no stage: its first steps settle the step all the same
            self.gate.begin_stage(self.tokens(s.image_size))

    @property
    def fused_ffn(self) -> bool:
        """The locality FFN runs as the Triton kernel now (--fused-ffn, resolved, and not fallen back)."""
        return bool(self.paths.running["ffn"])

    # -- the run, top to bottom ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.announce()
        if self.fused_ffn:  # the evaluation probe runs it first: checked at the evaluation's shapes
            self.check_fused_ffn(self.cfg.final_eval_size, 2)
        if self.state.stage >= 0:  # resumed mid-stage: the fast paths are checked here, as at an entry
            self.stage_paths()
        self.probe_evaluation()
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
        the loader rebuilt (the old pipeline freed), the step re-prepared (a captured graph is recaptured), a
        checkpoint. A stage whose entry cannot fit in what is left is not entered: the run goes on at its size."""
        s, cfg = self.state, self.cfg
        target = int(self.world.rank0(self.target_stage()))
        size = self.plan.size_of(target)
        if s.stage >= 0 and not self.agreed(self.gate.can_enter_stage(self.tokens(size))):
            self.stages_closed = True
            estimate = self.gate.entry_estimate(self.tokens(size)) or 0.0
            self.run_dir.log("stage_skipped", stage=target, image_size=size,
                             entry_estimate_s=round(estimate, 3), remaining_s=round(self.budget.remaining, 3),
                             elapsed_s=round(self.budget.elapsed, 3))
            self.readout.message(f"stage {target} ({size} px) not entered: entering it takes "
                                 f"~{estimate:.1f}s and {self.budget.remaining:.1f}s are left; training on at "
                                 f"{s.image_size} px")
            return False
        start = self.clock()
        self.gate.begin_stage(self.tokens(size))
        s.stage, s.image_size = target, size
        s.batch_size = stage_batch_size(cfg.batch_size, size, self.plan.final, cfg.stage_batch,
                                        min(cfg.max_batch, len(self.train_split) // cfg.world_size))
        s.peak_lr = stage_lr(cfg.peak_lr, s.batch_size, cfg.batch_size)  # the schedule scales it step by step
        self.step.move_to(size)  # the captured graph dropped, the position embedding and its Adam moments resized
        self.train_batches.set_stage(self.spec(size, s.batch_size))
        self.stage_paths()  # the fused FFN checked at this stage's shapes; what runs here recorded
        rebuild_s = self.clock() - start
        self.train_flops = 3.0 * forward_flops(self.net, size)
        fields = dict(step=s.step, stage=s.stage, epoch=s.epoch, image_size=size, batch_size=s.batch_size,
                      peak_lr=s.peak_lr, steps_per_epoch=len(self.train_batches), rebuild_s=round(rebuild_s, 4),
                      step_mode=self.mode, fused_ffn=self.fused_ffn, decoder=self.paths.running["decoder"],
                      source_px=getattr(self.train_batches, "source_px", None),
                      elapsed_s=round(self.budget.elapsed, 3))
        self.run_dir.log("stage", **fields)
        self.readout.update(**fields)
        if self.readout.live:
            source = f", reading the {fields['source_px']}-px copy" if fields["source_px"] else ""
            self.readout.message(f"stage {s.stage}: {size} px, batch {s.batch_size}{source}, "
                                 f"rebuilt in {rebuild_s:.2f}s")
        self.last_ckpt_t = self.budget.elapsed
        self.checkpoint()
        return True

    def run_epoch(self) -> bool:
        """Steps until the epoch ends (True) or the gate says there is no time for another (False)."""
        s = self.state
        # a whole epoch ends with the loader's own end (a sharded reader drains its padding there); a resumed one
        # after the steps it had left
        steps = len(self.train_batches)
        stop_at = steps if s.epoch_step else math.inf
        self._t_prev = self.budget.elapsed
        fetch_start = self.clock()
        for images, labels in self.train_batches:
            self.wait_s += self.clock() - fetch_start
            self.synced = s.step >= self.next_sync
            if self.synced:
                verdict = self.sync()
                if verdict == STOP_DIVERGED:
                    raise Diverged(f"the loss became non-finite by step {s.step}")
                if verdict == STOP_SIGNAL:
                    assert self.stop_signal is not None
                    raise StopRequested(self.stop_signal, self.checkpoint())
                if verdict == STOP_BUDGET:
                    s.epoch_progress = s.epoch_step / steps
                    return False
                if verdict == NEXT_STAGE:
                    self.pass_cut = True  # a time-placed stage begins mid-epoch: this pass ends, the next afresh
                    break
            self.train_step(images, labels)
            if self.synced and self.world.is_main:
                self.maybe_log()
                self.maybe_checkpoint()
            if s.epoch_step >= stop_at:  # a resumed epoch ends after its remaining steps, its reader mid-epoch:
                self.train_batches.close()  # the next epoch starts from a fresh pipeline
                break
            fetch_start = self.clock()
        s.epoch += 1
        s.epoch_step = 0
        s.epoch_progress = 0.0
        return True

    def sync(self) -> int:
        """Before a step: stop (a non-finite loss, a signal, the budget), end the pass for a time-placed stage, or
        go on. One process asks its own gate (no device sync: non-finite losses are caught at metrics lines).
        Data-parallel, every rank asks here at the same step: any rank's signal or non-finite loss stops all, rank
        0's gate decides the rest, and rank 0 names the step of the next sync and shares its clock."""
        s = self.state
        signum = signal.Signals[self.stop.reason].value if self.stop.reason else 0
        if self.world.distributed and self.step.diverged():  # a host sync, once per sync
            verdict = STOP_DIVERGED
        elif signum:
            verdict = STOP_SIGNAL
        elif not self.world.is_main:  # the questions of time are rank 0's to answer
            verdict = CONTINUE
        elif not self.gate.should_continue():
            verdict = STOP_BUDGET
        elif self.plan.timed and s.epoch_step and self.stage_due():
            verdict = NEXT_STAGE
        else:
            verdict = CONTINUE
        if not self.world.distributed:
            self.next_sync = s.step + 1
            self.stop_signal = self.stop.reason
            return verdict
        (verdict, signum), (elapsed, step_s, next_in) = self.world.agree(
            (verdict, signum), (self.budget.elapsed, self.gate.step_s or 0.0, self.steps_to_next_sync()))
        self.shared_clock = (elapsed, step_s, s.step)
        self.next_sync = s.step + int(next_in)
        self.stop_signal = signal.Signals(signum).name if signum else None
        return verdict

    def steps_to_next_sync(self) -> int:
        """Rank 0: steps until the ranks next sync — a metrics interval's worth, at most half of the steps that
        still fit before the reserved end (so the last syncs come closer together), at most until a time-placed
        stage begins; every step while the step is settling (its time not yet known)."""
        step_s = self.gate.step_s
        if self.step.settling or not step_s:
            return 1
        fit = (self.budget.remaining - self.budget.reserve_s) / step_s
        steps = min(math.ceil(self.cfg.log_every_s / step_s), fit / 2)
        if self.plan.timed and self.state.stage + 1 < self.plan.num_stages:
            starts = self.plan.starts[self.state.stage + 1] * self.cfg.budget_s
            steps = min(steps, (starts - self.budget.elapsed) / step_s)
        return max(1, int(steps))

    def agreed(self, verdict: bool) -> bool:
        """Rank 0's verdict on a question of time (evaluate now? enter the next stage?), shared by every rank."""
        return bool(self.world.rank0(verdict))

    @property
    def fraction(self) -> float:
        """The share of the budget spent, as the lr schedule reads it: this process's clock, or data-parallel,
        rank 0's at the last sync extrapolated by its step time (the same number on every rank, so every rank
        steps with the same lr)."""
        if not self.world.distributed:
            return self.budget.fraction
        elapsed, step_s, at = self.shared_clock
        return min(1.0, (elapsed + (self.state.step - at) * step_s) / self.cfg.budget_s)

    def restart_epoch_on_new_world(self, resume: dict[str, Any]) -> None:
        """A checkpoint written by another number of processes: the epoch's shards and steps differ, so the data
        position restarts at the beginning of the epoch it was in (the budget and the schedule carry over)."""
        s = self.state
        before = resume.get("config", {}).get("world_size", 1)
        if before == self.world.world_size or not s.epoch_step:
            return
        self.readout.message(f"resuming on {self.world.world_size} process(es) from a checkpoint of {before}: epoch "
                             f"{s.epoch} restarts from its beginning ({s.epoch_step} steps of it were done)")
        self.run_dir.log("resume_world", world_size=self.world.world_size, checkpoint_world_size=before,
                         epoch=s.epoch, epoch_steps_dropped=s.epoch_step)
        s.epoch_step, s.epoch_progress = 0, 0.0

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        s, cfg = self.state, self.cfg
        fraction = self.fraction
        if s.train_from < 0:
            s.train_from = min(fraction, 0.5)
        factor = lr_factor(cfg.lr_schedule, (fraction - s.train_from) / (1.0 - s.train_from),
                           epoch=s.epoch + s.epoch_step / len(self.train_batches), epochs=cfg.epochs,
                           warmup_fraction=self.warmup_fraction, min_ratio=min(1.0, cfg.min_lr / s.peak_lr))
        s.lr = s.peak_lr * factor
        settling = self.step.settling
        self.loss = self.step(images, labels, lr=s.lr)
        if not settling and self.step.times.steps == 1:  # the step fell back mid-stage: its new mode settled here
            settling = True
            self.gate.step_changed()
        if settling and not self.step.settling:
            self.step.synchronize()  # once per stage: the entry's cost is measured to its end, not to its launch
        s.step += 1
        s.epoch_step += 1
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
        self.last_eval = None
        if (not cut and self.cfg.eval_every and self.state.epoch % self.cfg.eval_every == 0
                and self.agreed(self.gate.can_evaluate())):
            self.evaluate()

    def finish(self) -> dict[str, Any]:
        """The final evaluation (unless the last epoch's is current), the final checkpoint and weights."""
        s = self.state
        train_s = self.budget.elapsed
        if self.last_eval is None or s.epoch_progress > 0:
            self.evaluate()
        assert self.last_eval is not None
        self.train_batches.close()
        self.val_batches.close()
        final_checkpoint = self.checkpoint()
        if self.world.is_main:
            save_safetensors_atomic(self.evaluated.state_dict(), self.run_dir.path / "model.safetensors")
        return {
            "top1": self.last_eval["top1"], "top5": self.last_eval["top5"],
            # passes over the data: a pass cut short by a time-placed stage change counts for what it read
            "epochs": round(s.images_seen / len(self.train_split), 4), "steps": s.step,
            "images_seen": s.images_seen, "elapsed_s": round(self.budget.elapsed, 3), "train_s": round(train_s, 3),
            "budget_s": self.cfg.budget_s, "overshoot_s": round(self.budget.elapsed - self.cfg.budget_s, 3),
            "stop_reason": "budget", "model": self.cfg.model, "image_size": s.image_size,
            "eval_size": self.cfg.final_eval_size, "stages_reached": s.stage + 1,
            "stages_skipped": self.stages_closed, "params": self.params, "step_mode": self.mode,
            "fused_ffn": self.fused_ffn, "decoder": self.paths.running["decoder"],
            # what ran at each stage this process entered, and every fast path that fell back (and why)
            "stages": self.ran, "fallbacks": self.paths.events,
            "attempts": s.attempt + 1, "checkpoint": str(final_checkpoint.relative_to(self.run_dir.path)),
            "device": str(self.device), "world_size": self.world.world_size, "global_batch": self.cfg.global_batch,
            "state": asdict(s),
        }

    # -- the fast paths ----------------------------------------------------------------------------------------------

    def stage_paths(self) -> None:
        """At a stage's entry: check the fused FFN at its shapes (it falls back to PyTorch's ops if it fails or
        disagrees), then record what runs at this stage."""
        s = self.state
        if self.fused_ffn:
            self.check_fused_ffn(s.image_size, s.batch_size)
        self.paths.running["decoder"] = getattr(self.train_batches, "decoder", None)
        self.ran.append({"stage": s.stage, "image_size": s.image_size, "step_mode": self.mode,
                         "fused_ffn": self.fused_ffn, "decoder": self.paths.running["decoder"]})

    def check_fused_ffn(self, size: int, batch: int) -> None:
        """The fused kernels, forward and backward, once at a stage's batch, grid and dtype (the shapes Triton
        compiles them for) against PyTorch's ops on the same input (``model.fused_ffn.self_check``): an error, or a
        result off by more than the dtype's tolerance, and every locality FFN (the EMA copy's too) runs PyTorch's
        ops for the rest of the run."""
        from model import fused_ffn
        from model.locality_vit import LocalityFeedForward, set_fused

        s = self.state
        ffn = next(m for m in self.net.modules() if isinstance(m, LocalityFeedForward))
        dtype = self.amp or torch.float32
        side = size // self.plan.patch
        problem: BaseException | str | None = None
        try:
            error = fused_ffn.self_check(ffn.dwconv.weight, batch, (side, side),
                                         getattr(self.net, "num_prefix_tokens", 1), dtype, seed=s.step)
            tolerance = fused_ffn.tolerance(dtype)
            if not error <= tolerance:  # NaN included
                problem = (f"its result differs from PyTorch's ops by {error:.3g} (relative, at {size} px, "
                           f"{str(dtype).removeprefix('torch.')}; tolerance {tolerance:.3g})")
        except Exception as e:  # noqa: BLE001 - a Triton compile or launch error: reported, then passed by
            problem = e
        if problem is None:
            return
        self.paths.fell_back("ffn", True, False, problem)
        set_fused(self.net, False)
        if self.step.ema is not None:
            set_fused(self.step.ema.module, False)

    def step_fell_back(self, failed: str, to: str, error: BaseException, why: str) -> None:
        """TrainStep's fallback: recorded (or, under --strict-fast-paths, refused), then the step runs as ``to``."""
        self.paths.fell_back("step", failed, to, error, why)
        self.mode = to
        if self.ran:
            self.ran[-1]["step_mode"] = to

    def decoder_fell_back(self, which: str) -> Callable[[str, str, BaseException], None]:
        """The loaders' fallback: this stage's ``which`` pipeline decodes on the CPU."""

        def fell_back(failed: str, to: str, error: BaseException) -> None:
            self.paths.fell_back("decoder", failed, to, error, f"the {which} pipeline at this stage; the next stage "
                                                                "tries the GPU decoder again")
            if which == "train" and self.ran and self.ran[-1]["stage"] == self.state.stage:
                self.ran[-1]["decoder"] = to

        return fell_back

    # -- pieces ----------------------------------------------------------------------------------------------------

    def spec(self, size: int, batch: int, train: bool = True) -> StageSpec:  # a new shuffle order per attempt
        return stage_spec(self.cfg, self.device, size, batch, seed=self.cfg.seed + self.state.attempt, train=train,
                          world=self.world)

    def tokens(self, size: int) -> int:
        return (size // self.plan.patch) ** 2

    def announce(self) -> None:
        cfg, s = self.cfg, self.state
        self.run_dir.log("start", model=cfg.model, params=self.params, device=str(self.device), amp=str(self.amp),
                         step_mode=self.mode, fused_ffn=self.fused_ffn, attempt=s.attempt,
                         world_size=self.world.world_size,
                         global_batch=cfg.global_batch, train_images=len(self.train_split),
                         val_images=len(self.val_split), stages=[asdict(st) for st in self.plan.stages()],
                         skipped_files={"train": dict(self.train_split.skipped), "val": dict(self.val_split.skipped)},
                         eval_size=cfg.final_eval_size, elapsed_s=round(self.budget.elapsed, 3))
        if self.mode_note:  # an explicit --step that cannot run here: loud, or under --strict-fast-paths, the end
            if cfg.strict_fast_paths:
                raise FastPathError(f"{self.mode_note} (--strict-fast-paths forbids it)")
            self.paths.events.append({"path": "step", "failed": cfg.step, "to": self.mode, "error": self.mode_note,
                                      "explicit": True, "step": s.step, "stage": s.stage})
            self.run_dir.log("fallback", **self.paths.events[-1])
            self.readout.warn(f"WARNING: {self.mode_note}", loud=True)
        self.readout.message(f"{cfg.model} ({self.params / 1e6:.1f}M params) on {self.device}, amp {self.amp}, "
                             f"step {self.mode}{', fused FFN' if self.fused_ffn else ''}, peak lr {cfg.peak_lr:.3g}, "
                             f"{len(self.train_split)} train / {len(self.val_split)} val images, "
                             f"{len(self.train_split.classes)} classes, "
                             f"budget {cfg.budget_s:.0f}s, eval at {cfg.final_eval_size} px")
        if self.world.distributed:
            self.readout.message(f"data-parallel: {self.world.world_size} processes x batch {cfg.batch_size} = "
                                 f"{cfg.global_batch} images per step (the lr follows the global batch)")
        if not s.attempt:
            for line in plan_lines(self.plan, cfg, len(self.train_split)):
                self.readout.message(line)

    def probe_evaluation(self) -> None:
        """Before any evaluation is measured, the end must still be reserved: time the val pipeline's build and
        its first batches (decode, the model at the eval size, autotuning), extrapolate to the whole split, and
        start the real evaluations from a fresh pipeline. Skipped when evaluations are not charged."""
        if not self.gate.charge_eval or self.gate.eval_s is not None:
            return
        batches = len(self.val_batches)
        val = iter(self.val_batches)  # one pass, read in two parts: the first batch, then the next ones
        start = self.clock()
        first = self.evaluate_model(self.evaluated, itertools.islice(val, 1), self.amp)
        first_s = self.clock() - start
        rest_s, rest = 0.0, min(PROBE_BATCHES - 1, batches - 1)
        if rest > 0:
            t = self.clock()
            self.evaluate_model(self.evaluated, itertools.islice(val, rest), self.amp)
            rest_s = self.clock() - t
        del val
        self.val_batches.close()  # a partial epoch: the first real evaluation starts a new one
        per_batch = rest_s / rest if rest > 0 else first_s
        # the build and first batch once more: the real first evaluation rebuilds, and a partial last batch is a
        # new shape to autotune
        estimate = 2 * first_s + max(0, batches - 1) * per_batch
        self.gate.estimate_eval(estimate)
        self.run_dir.log("eval_probe", batches=1 + rest, first_batch_s=round(first_s, 4),
                         per_batch_s=round(per_batch, 4), estimate_s=round(estimate, 3), images=first["images"],
                         elapsed_s=round(self.budget.elapsed, 3))

    def evaluate(self) -> dict[str, float]:
        s = self.state
        start = self.clock()
        with self.budget.uncharged(self.cfg.budget_counts == "train"):
            result = self.evaluate_model(self.evaluated, self.val_batches, self.amp)
        eval_s = self.clock() - start
        self.last_eval, self.last_eval_s = result, eval_s
        if self.gate.charge_eval:
            self.gate.record_eval(eval_s)
        fields = dict(step=s.step, epoch=round(s.epoch + s.epoch_progress, 4), stage=s.stage,
                      image_size=self.cfg.final_eval_size, images=result.get("images"), top1=round(result["top1"], 5),
                      top5=round(result["top5"], 5), eval_s=round(eval_s, 3), elapsed_s=round(self.budget.elapsed, 3))
        self.run_dir.log("eval", **fields)
        self.readout.update(**{k: v for k, v in fields.items() if k not in ("image_size", "images")})
        if self.readout.live:  # plain mode already printed the line
            self.readout.message(f"epoch {fields['epoch']}: val top1 {100 * result['top1']:.2f}%  "
                                 f"top5 {100 * result['top5']:.2f}%")
        return result

    def maybe_log(self) -> None:
        s = self.state
        now = self.budget.elapsed
        interval = now - self.last_log_t
        if interval < self.cfg.log_every_s:
            return
        assert self.loss is not None
        loss_value = self.loss.item()  # the one host sync per log interval
        if not self.world.distributed and self.step.diverged():  # data-parallel: every rank checks at a sync
            raise Diverged(f"the loss became non-finite by step {s.step}")
        ips = (s.images_seen - self.last_log_images) / interval  # over all ranks
        tflops = ips * self.train_flops / 1e12
        mfu = float(f"{tflops * 1e12 / (self.peak * self.world.world_size):.4g}") if self.peak else None
        fields = dict(step=s.step, epoch=s.epoch, stage=s.stage, image_size=s.image_size, batch_size=s.batch_size,
                      images_per_sec=round(ips, 2), loss=round(loss_value, 5), lr=s.lr, images_seen=s.images_seen,
                      interval_s=round(interval, 3), data_wait=round(min(1.0, self.wait_s / interval), 4),
                      tflops=float(f"{tflops:.4g}"), mfu=mfu,
                      elapsed_s=round(now, 3),
                      # at this stage's pace (later stages are slower: an upper bound)
                      projected_epochs=round((s.images_seen + ips * self.budget.remaining) / len(self.train_split), 2),
                      **device_memory(self.device))
        self.run_dir.log("train", **fields)
        self.readout.update(**fields)
        if self.plan.timed and s.stage not in self._projected:
            self.project_plan(ips)
        self.last_log_t, self.last_log_images, self.wait_s = now, s.images_seen, 0.0

    def project_plan(self, ips: float) -> None:
        """The time-placed plan in epochs, from this stage's measured speed: other stages' speeds are scaled by
        image side, as the plan's time split assumes (logged once per stage, as a ``plan`` event)."""
        s = self.state
        self._projected.add(s.stage)
        starts = (*self.plan.starts, 1.0)
        epochs = {}
        for k in range(self.plan.num_stages):
            seconds = (starts[k + 1] - starts[k]) * self.cfg.budget_s
            stage_ips = ips * s.image_size / self.plan.size_of(k)
            epochs[self.plan.size_of(k)] = round(seconds * stage_ips / len(self.train_split), 2)
        self.run_dir.log("plan", stage=s.stage, images_per_sec=round(ips, 2), projected_epochs=epochs,
                         elapsed_s=round(self.budget.elapsed, 3))
        self.readout.message("projected epochs per stage at this pace: "
                             + ", ".join(f"{size} px {n:g}" for size, n in epochs.items()))

    def maybe_checkpoint(self) -> None:
        if self.budget.elapsed - self.last_ckpt_t >= self.cfg.ckpt_every_s:
            self.checkpoint()
            self.last_ckpt_t = self.budget.elapsed

    def checkpoint(self) -> Path:
        """Rank 0 writes (every rank holds the same weights and optimizer state); the others return at once."""
        if not self.world.is_main:
            return self.run_dir.path / "checkpoints"
        start = self.clock()
        if not self.world.distributed and self.step.diverged():  # data-parallel: checked by every rank at a sync
            raise Diverged(f"the loss became non-finite by step {self.state.step}")
        path = save_checkpoint(self.run_dir.path / "checkpoints", self.state.step, self.state_dict())
        write_s = self.clock() - start
        self.gate.record_checkpoint(write_s)
        self.run_dir.log("checkpoint", step=self.state.step, path=str(path.relative_to(self.run_dir.path)),
                         write_s=round(write_s, 3), elapsed_s=round(self.budget.elapsed, 3))
        return path

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's payload (loaded with ``weights_only=True``): the same whatever the step mode."""
        payload = {"model": self.net.state_dict(), "optimizer": optimizer_state_dict(self.step.optimizer),
                   "scaler": self.step.scaler.state_dict(), "rng": rng_state(), "state": asdict(self.state),
                   "budget_spent_s": self.budget.elapsed, "last_eval_s": self.last_eval_s,
                   "config": asdict(self.cfg), "format": 1}
        if self.step.ema is not None:
            payload["ema"] = self.step.ema.module.state_dict()
        return payload

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.net.load_state_dict(payload["model"])
        load_optimizer_state(self.step.optimizer, payload["optimizer"])
        self.step.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        if self.step.ema is not None:
            self.step.ema.module.load_state_dict(payload["ema"])


def train(cfg: TrainConfig, train_split: Split, val_split: Split, run: RunDir, readout: Readout,
          budget: Budget, resume: dict[str, Any] | None = None, stop: StopFlag | None = None,
          loader: Callable[..., StageLoader] = StageLoader, world: World | None = None) -> dict[str, Any]:
    """Train until the budget ends; returns the summary."""
    return Trainer(cfg, train_split, val_split, run, readout, budget, resume=resume, stop=stop, loader=loader,
                   world=world).run()
