"""The training loop, top to bottom: build -> per epoch (stage change -> steps until the budget says stop -> eval)
-> final evaluation at the final size."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from model import build_model, set_grid
from model.flops import forward_flops
from pipelines import Split, StageLoader, StageSpec
from trainer.augment import BatchAugment
from trainer.budget import Budget, end_reserve
from trainer.checkpoint import rng_state, save_checkpoint, set_rng_state
from trainer.config import TrainConfig
from trainer.curriculum import CurriculumPlan, stage_batch_size, stage_lr
from trainer.evaluate import evaluate
from trainer.hardware import peak_flops
from trainer.readout import Readout
from trainer.resize import resize_for_stage
from trainer.rundir import RunDir, save_safetensors_atomic
from trainer.schedule import lr_factor

EVAL_BATCH = 128


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the card has it, else fp16 (with a grad scaler); none on the CPU."""
    if device.type != "cuda" or name == "off":
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def stage_spec(cfg: TrainConfig, device: torch.device, image_size: int, batch_size: int,
               seed: int | None = None, train: bool = True) -> StageSpec:
    return StageSpec.on(device, image_size=image_size, batch_size=batch_size, num_threads=cfg.workers,
                        seed=cfg.seed if seed is None else seed,
                     interp="cubic" if cfg.interp == "bicubic" else "linear",
                     rand_augment=randaug_bins(cfg) if train else None, min_area=cfg.min_area,
                     source_ratio=cfg.source_ratio)


def randaug_bins(cfg: TrainConfig) -> tuple[int, int] | None:
    """timm's magnitude (0..10) on DALI's 31 bins (0..30): m9 -> 27."""
    return (cfg.randaug_n, round(cfg.randaug * 3)) if cfg.randaug else None


def device_memory(device: torch.device) -> dict[str, float]:
    """GiB allocated now and at peak by PyTorch on the device (host-side counters: no sync)."""
    if device.type != "cuda":
        return {}
    return {"mem_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "mem_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def weight_decay_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (norms, biases) nor the model's ``no_weight_decay()`` names
    (position embedding, class token)."""
    return param_groups_weight_decay(net, weight_decay, no_weight_decay_list=net.no_weight_decay())


def plan_lines(plan: CurriculumPlan, cfg: TrainConfig, train_images: int) -> list[str]:
    lines = [f"{'stage':>5} {'epochs':>9} {'size':>5} {'tokens':>6} {'batch':>5}"]
    for s in plan.stages():
        epochs = f"{s.first_epoch}-{s.last_epoch}" if s.last_epoch is not None else f"{s.first_epoch}+"
        batch = stage_batch_size(cfg.batch_size, s.image_size, plan.final, cfg.stage_batch,
                                 min(cfg.max_batch, train_images))
        lines.append(f"{s.index:>5} {epochs:>9} {s.image_size:>5} {s.tokens:>6} {batch:>5}")
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


def train(cfg: TrainConfig, train_split: Split, val_split: Split, run: RunDir, readout: Readout,
          budget: Budget, resume: dict[str, Any] | None = None, stop: StopFlag | None = None,
          loader: Callable[..., StageLoader] = StageLoader) -> dict[str, Any]:
    """Train until the budget ends. ``loader`` builds the train and val loaders (``StageLoader``; benchmarks pass
    a synthetic one with the same interface)."""
    stop = stop or StopFlag()
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    plan = cfg.plan()
    state = TrainState(**resume["state"]) if resume else TrainState()
    if resume:
        state.attempt += 1
    torch.manual_seed(cfg.seed + state.attempt)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast

    net = build_model(cfg.model, num_classes=len(train_split.classes), image_size=state.image_size or plan.start,
                      act=cfg.act, drop_path=cfg.drop_path)
    net = net.to(device, memory_format=torch.channels_last)
    if cfg.compile:
        # Static shapes, one graph per stage: a stage change recompiles once, steps never do.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, plan.num_stages + 2)
    forward = torch.compile(net, dynamic=False) if cfg.compile else net
    groups = weight_decay_groups(net, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    augment = BatchAugment(cfg, len(train_split.classes), device)
    ema = ModelEmaV3(net, decay=cfg.ema) if cfg.ema else None
    if resume:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"])
    evaluated = ema.module if ema is not None else net  # with --ema, the averaged weights are what is evaluated

    def spec(size: int, batch: int, train: bool = True) -> StageSpec:  # a new shuffle order for each attempt
        return stage_spec(cfg, device, size, batch, seed=cfg.seed + state.attempt, train=train)

    train_batches = loader(train_split, spec(state.image_size or plan.start, state.batch_size or cfg.batch_size),
                           train=True, device=device)
    val_batches = loader(val_split, spec(cfg.final_eval_size, EVAL_BATCH, train=False), train=False, device=device)

    params = sum(p.numel() for p in net.parameters())
    run.log("start", model=cfg.model, params=params, device=str(device), amp=str(amp_dtype), attempt=state.attempt,
            train_images=len(train_split), val_images=len(val_split), stages=[asdict(s) for s in plan.stages()],
            eval_size=cfg.final_eval_size, elapsed_s=round(budget.elapsed, 3))
    readout.message(f"{cfg.model} ({params / 1e6:.1f}M params) on {device}, amp {amp_dtype}, "
                    f"peak lr {cfg.peak_lr:.3g}, {len(train_split)} train / {len(val_split)} val images, "
                    f"{len(train_split.classes)} classes, "
                    f"budget {cfg.budget_s:.0f}s, eval at {cfg.final_eval_size} px")
    if not resume:
        for line in plan_lines(plan, cfg, len(train_split)):
            readout.message(line)

    last_eval_s: float | None = resume.get("last_eval_s") if resume else None
    checkpoint_s = 0.0  # the last checkpoint's write time: the final one is part of the reserved end
    checkpoints = run.path / "checkpoints"

    def set_reserve(estimated_eval_s: float = 0.0) -> None:
        charged = cfg.budget_counts == "all"  # with "train", evaluations are not charged, so not reserved
        budget.reserve_s = end_reserve(last_eval_s if charged else 0.0, estimated_eval_s if charged else 0.0,
                                       checkpoint_s)

    set_reserve()

    def checkpoint() -> Path:
        nonlocal checkpoint_s
        start = time.monotonic()
        if nonfinite is not None and nonfinite.item():
            raise Diverged(f"the loss became non-finite by step {state.step}")
        payload = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                   "rng": rng_state(), "state": asdict(state), "budget_spent_s": budget.elapsed,
                   "last_eval_s": last_eval_s, "config": asdict(cfg), "format": 1}
        if ema is not None:
            payload["ema"] = ema.module.state_dict()
        path = save_checkpoint(checkpoints, state.step, payload)
        checkpoint_s = time.monotonic() - start
        set_reserve()
        run.log("checkpoint", step=state.step, path=str(path.relative_to(run.path)), write_s=round(checkpoint_s, 3),
                elapsed_s=round(budget.elapsed, 3))
        return path

    # Non-finite losses are flagged on the device (no sync) and read at log intervals and checkpoints.
    # With fp16 the grad scaler skips such steps itself.
    nonfinite = None if scaler.is_enabled() else torch.zeros((), dtype=torch.bool, device=device)
    step_s: float | None = None  # moving average of one step's wall time at this stage, data wait included
    last_eval: dict[str, float] | None = None
    warmup_fraction = cfg.warmup_s / cfg.budget_s
    eval_tokens = (cfg.final_eval_size // plan.patch) ** 2
    net.train()
    last_log_t, last_log_images = budget.elapsed, state.images_seen
    last_ckpt_t = budget.elapsed
    peak = peak_flops(device)
    train_flops = 0.0  # per image at the current stage: forward + backward ~ 3x the forward
    wait_s = 0.0  # time the step loop spent waiting on the loader since the last metrics line
    while True:
        if plan.stage_at(state.epoch) != state.stage:
            _enter_stage(plan, state, cfg, net, optimizer, train_batches, spec, run, readout, budget,
                         len(train_split))
            if ema is not None:
                set_grid(ema.module, state.image_size)
            train_flops = 3.0 * forward_flops(net, state.image_size)
            step_s = None
            last_ckpt_t = budget.elapsed
            checkpoint()
        if not train_flops:  # a resumed run enters no stage
            train_flops = 3.0 * forward_flops(net, state.image_size)
        t_prev = budget.elapsed
        first_step_of_stage = step_s is None
        out_of_time = False
        fetch_start = time.monotonic()
        for images, labels in train_batches:
            wait_s += time.monotonic() - fetch_start
            if stop.reason:
                raise StopRequested(stop.reason, checkpoint())
            if step_s is not None and not budget.can_start(step_s):
                out_of_time = True
                break
            factor = lr_factor(cfg.lr_schedule, budget.fraction,
                               epoch=state.epoch + state.epoch_step / len(train_batches), epochs=cfg.epochs,
                               warmup_fraction=warmup_fraction, min_ratio=cfg.min_lr / cfg.lr)
            state.lr = state.peak_lr * factor
            for group in optimizer.param_groups:
                group["lr"] = state.lr
            images, targets = augment(images, labels)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = augment.criterion(forward(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(net, step=state.step)
            if nonfinite is not None:
                nonfinite |= ~torch.isfinite(loss.detach())
            state.step += 1
            state.epoch_step += 1
            state.images_seen += labels.shape[0]

            now = budget.elapsed
            dt, t_prev = now - t_prev, now
            if first_step_of_stage:  # pipeline warm-up, cuDNN autotuning, a recompile: not a step's cost
                first_step_of_stage = False
            else:
                step_s = dt if step_s is None else 0.9 * step_s + 0.1 * dt
                if last_eval_s is None and cfg.budget_counts == "all":  # until one is measured: forward-only
                    # costs ~1/3 of a step per image, scaled by tokens
                    tokens = (state.image_size // plan.patch) ** 2
                    estimate = len(val_split) * step_s / state.batch_size * eval_tokens / tokens / 2
                    set_reserve(estimate)
            if now - last_log_t >= cfg.log_every_s:
                loss_value = loss.item()  # the one host sync per log interval
                if nonfinite is not None and nonfinite.item():
                    raise Diverged(f"the loss became non-finite by step {state.step}")
                interval = now - last_log_t
                ips = (state.images_seen - last_log_images) / interval
                tflops = ips * train_flops / 1e12
                fields = dict(step=state.step, epoch=state.epoch, stage=state.stage, image_size=state.image_size,
                              batch_size=state.batch_size, images_per_sec=round(ips, 2), loss=round(loss_value, 5),
                              lr=state.lr, images_seen=state.images_seen, interval_s=round(interval, 3),
                              data_wait=round(min(1.0, wait_s / interval), 4), tflops=float(f"{tflops:.4g}"),
                              mfu=float(f"{tflops * 1e12 / peak:.4g}") if peak else None, elapsed_s=round(now, 3),
                              # at this stage's pace (later stages are slower: an upper bound)
                              projected_epochs=round((state.images_seen + ips * budget.remaining) / len(train_split),
                                                     2),
                              **device_memory(device))
                run.log("train", **fields)
                readout.update(**fields)
                last_log_t, last_log_images, wait_s = now, state.images_seen, 0.0
            if now - last_ckpt_t >= cfg.ckpt_every_s:
                checkpoint()
                last_ckpt_t = budget.elapsed
            if state.epoch_step >= len(train_batches):  # a resumed epoch ends after its remaining steps
                break
            fetch_start = time.monotonic()
        if out_of_time:
            state.epoch_progress = state.epoch_step / len(train_batches)
            break
        state.epoch += 1
        state.epoch_step = 0
        last_eval = None
        if cfg.eval_every and state.epoch % cfg.eval_every == 0 and budget.can_start(last_eval_s or 0.0):
            last_eval = _evaluate(evaluated, val_batches, amp_dtype, state, cfg, run, readout, budget)
            last_eval_s = last_eval["eval_s"]
            set_reserve()
        if not budget.can_start(step_s or 0.0):
            break

    train_s = budget.elapsed
    if last_eval is None or state.epoch_progress > 0:
        last_eval = _evaluate(evaluated, val_batches, amp_dtype, state, cfg, run, readout, budget)
        last_eval_s = last_eval["eval_s"]
    train_batches.close()
    val_batches.close()
    final_checkpoint = checkpoint()
    save_safetensors_atomic(evaluated.state_dict(), run.path / "model.safetensors")
    return {
        "top1": last_eval["top1"], "top5": last_eval["top5"],
        "epochs": round(state.epoch + state.epoch_progress, 4), "steps": state.step,
        "images_seen": state.images_seen, "elapsed_s": round(budget.elapsed, 3), "train_s": round(train_s, 3),
        "budget_s": cfg.budget_s, "overshoot_s": round(budget.elapsed - cfg.budget_s, 3),
        "stop_reason": "budget", "model": cfg.model, "image_size": state.image_size,
        "eval_size": cfg.final_eval_size, "stages_reached": state.stage + 1, "params": params,
        "attempts": state.attempt + 1, "checkpoint": str(final_checkpoint.relative_to(run.path)),
        "device": str(device), "state": asdict(state),
    }


def _enter_stage(plan: CurriculumPlan, state: TrainState, cfg: TrainConfig, net: nn.Module,
                 optimizer: torch.optim.Optimizer, train_batches: StageLoader,
                 spec: Callable[[int, int], StageSpec], run: RunDir, readout: Readout, budget: Budget,
                 train_images: int) -> None:
    """Stage change at an epoch boundary: new size and batch, position embedding and optimizer state resized,
    the loader rebuilt (the old pipeline freed)."""
    start = time.monotonic()
    state.stage = plan.stage_at(state.epoch)
    state.image_size = plan.size_at(state.epoch)
    state.batch_size = stage_batch_size(cfg.batch_size, state.image_size, plan.final, cfg.stage_batch,
                                        min(cfg.max_batch, train_images))
    state.peak_lr = stage_lr(cfg.peak_lr, state.batch_size, cfg.batch_size)  # the schedule scales it step by step
    resize_for_stage(net, optimizer, state.image_size)
    train_batches.set_stage(spec(state.image_size, state.batch_size))
    rebuild_s = time.monotonic() - start
    fields = dict(stage=state.stage, epoch=state.epoch, image_size=state.image_size, batch_size=state.batch_size,
                  peak_lr=state.peak_lr, steps_per_epoch=len(train_batches), rebuild_s=round(rebuild_s, 4),
                  source_px=getattr(train_batches, "source_px", None), elapsed_s=round(budget.elapsed, 3))
    run.log("stage", **fields)
    readout.update(**fields)
    if readout.live:
        source = f", reading the {fields['source_px']}-px copy" if fields["source_px"] else ""
        readout.message(f"stage {state.stage}: {state.image_size} px, batch {state.batch_size}{source}, "
                        f"rebuilt in {rebuild_s:.2f}s")


def _evaluate(net: nn.Module, val_batches: StageLoader, amp_dtype: torch.dtype | None, state: TrainState,
              cfg: TrainConfig, run: RunDir, readout: Readout, budget: Budget) -> dict[str, float]:
    with budget.uncharged(cfg.budget_counts == "train"):
        result = evaluate(net, val_batches, amp_dtype)
    fields = dict(step=state.step, epoch=round(state.epoch + state.epoch_progress, 4), stage=state.stage,
                  image_size=cfg.final_eval_size, top1=round(result["top1"], 5), top5=round(result["top5"], 5),
                  eval_s=round(result["eval_s"], 3), elapsed_s=round(budget.elapsed, 3))
    run.log("eval", **fields)
    readout.update(**{k: v for k, v in fields.items() if k != "image_size"})
    if readout.live:  # plain mode already printed the line
        readout.message(
            f"epoch {fields['epoch']}: val top1 {100 * result['top1']:.2f}%  top5 {100 * result['top5']:.2f}%"
        )
    return result
