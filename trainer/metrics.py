"""What the loop reports: the start of a run (its plan), and every ``--log-every`` seconds one ``train`` line with
the throughput, FLOP/s, MFU and memory arithmetic, sent once to metrics.jsonl (and through it to the trackers) and
to the readout. ``NAMESPACED`` is the one map from an event's fields to the names the trackers show."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from trainer.budget import Budget
from trainer.config import TrainConfig, format_duration
from trainer.curriculum import CurriculumPlan
from trainer.data import stage_batch
from trainer.readout import Readout
from trainer.rundir import RunDir

# event -> {field: the name trackers show it under}; the readout and metrics.jsonl keep the plain field names
NAMESPACED = {
    "train": {"loss": "train/loss", "lr": "train/lr", "images_per_sec": "train/images_per_sec",
              "data_wait": "train/data_wait", "tflops": "train/tflops", "mfu": "train/mfu",
              "mem_gib": "train/mem_gib", "mem_peak_gib": "train/mem_peak_gib", "epoch": "train/epoch",
              "image_size": "stage/image_size", "batch_size": "stage/batch_size", "elapsed_s": "budget/elapsed_s"},
    "eval": {"top1": "val/top1", "top5": "val/top5", "image_size": "val/image_size"},
}


def namespaced(event: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The event's fields that trackers show, under their namespaced names (``train/loss``, ``val/top1``)."""
    names = NAMESPACED.get(event, {})
    return {tag: fields[key] for key, tag in names.items() if fields.get(key) is not None}


def device_memory(device: torch.device) -> dict[str, float]:
    """GiB allocated now and at peak by PyTorch on the device (host-side counters: no sync)."""
    if device.type != "cuda":
        return {}
    return {"mem_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "mem_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def plan_lines(plan: CurriculumPlan, cfg: TrainConfig, train_images: int) -> list[str]:
    """The plan as printed at start: per stage its epochs (epoch form) or the moment of the budget it begins, and
    the per-process batch it runs with (``trainer.data.stage_batch``, as the run computes it)."""
    when = "begins at" if plan.timed else "epochs"
    lines = [f"{'stage':>5} {when:>16} {'size':>5} {'tokens':>6} {'batch':>5}"]
    for s in plan.stages():
        if s.starts_at is not None:
            at = s.starts_at * cfg.budget_s
            span = f"{100 * s.starts_at:.1f}% ({at / 3600:.2f}h)" if at >= 3600 else f"{100 * s.starts_at:.1f}% " \
                   f"({at:.0f}s)"
        else:
            span = f"{s.first_epoch}-{s.last_epoch}" if s.last_epoch is not None else f"{s.first_epoch}+"
        batch = stage_batch(cfg, s.image_size, train_images)
        lines.append(f"{s.index:>5} {span:>16} {s.image_size:>5} {s.tokens:>6} {batch:>5}")
    return lines


# What a CPU core sustains on this model family in training, measured: vit_local_tiny_patch16 at 64 px trains at
# ~0.14 TFLOP/s on the 2-core machine of docs/benchmarks.md (the train lines' TFLOP/s)
CPU_FLOPS_PER_CORE = 70e9
LARGE_PARAMS, LARGE_SIZE = 10_000_000, 160  # a model or image size a CPU takes hours over


def cost_lines(cfg: TrainConfig, budget: Budget, device: torch.device, net: torch.nn.Module, params: int,
               train_images: int) -> list[str]:
    """When the run ends on the wall clock, and on a CPU with a large model or image size what the budget buys
    there (an estimate from the model's FLOPs), so nobody waits a day for a surprise."""
    end = datetime.datetime.now() + datetime.timedelta(seconds=max(0.0, budget.remaining))
    lines = [f"the run ends by {end:%Y-%m-%d %H:%M} (local time; {format_duration(round(budget.remaining))} from now)"]
    if device.type == "cpu" and (params >= LARGE_PARAMS or cfg.image_size >= LARGE_SIZE):
        from model.flops import train_flops

        per_image = train_flops(net, cfg.image_size)
        ips = CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) / per_image
        epochs = ips * budget.remaining / max(1, train_images)
        lines.append(f"{cfg.model} at {cfg.image_size} px on the CPU: ~{ips:.0f} img/s, ~{epochs:.1f} epochs in this "
                     f"budget (an estimate from its FLOPs); a GPU, a smaller --model or --image-size goes further")
    return lines


class MetricsProcessor:
    """The run's reports. ``world_size`` processes step together: images are counted over all of them."""

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, readout: Readout, budget: Budget, plan: CurriculumPlan,
                 train_images: int, device: torch.device, peak_flops: float | None, world_size: int,
                 images_seen: int) -> None:
        self.cfg, self.run_dir, self.readout, self.budget, self.plan = cfg, run_dir, readout, budget, plan
        self.train_images, self.device, self.peak, self.world_size = train_images, device, peak_flops, world_size
        self.wait_s = 0.0  # time the loop waited on the loader since the last line
        self.last_t, self.last_images = budget.elapsed, images_seen
        self._projected: set[int] = set()  # stages whose time-placed plan was projected into epochs

    def emit(self, event: str, **fields: Any) -> None:
        """One event to metrics.jsonl (and the trackers) and the readout."""
        self.run_dir.log(event, **fields)
        self.readout.update(**fields)

    def announce(self, *, net: torch.nn.Module, params: int, amp: Any, step_mode: str, fused_ffn: bool,
                 attempt: int, train: Any, val: Any, holdout: dict[str, Any]) -> None:
        """The ``start`` event, the one-line description, data-parallel's line and (first attempt only) the plan.
        ``train``, ``val``: the splits; ``holdout``: the slice held out of train for the end's decisions."""
        cfg = self.cfg
        self.run_dir.log("start", model=cfg.model, params=params, device=str(self.device), amp=str(amp),
                         step_mode=step_mode, fused_ffn=fused_ffn, attempt=attempt, world_size=self.world_size,
                         global_batch=cfg.global_batch, train_images=len(train), val_images=len(val),
                         stages=[asdict(st) for st in self.plan.stages()],
                         skipped_files={"train": dict(train.skipped), "val": dict(val.skipped)},
                         eval_size=cfg.eval_size or ("auto" if holdout["images"] else cfg.image_size),
                         decisions={"holdout": holdout}, elapsed_s=round(self.budget.elapsed, 3))
        eval_at = (f"eval size chosen at the end on {holdout['images']} held-out training images"
                   if holdout["images"] else f"eval at {cfg.final_eval_size} px")
        self.readout.message(f"{cfg.model} ({params / 1e6:.1f}M params) on {self.device}, amp {amp}, step "
                             f"{step_mode}{', fused FFN' if fused_ffn else ''}, peak lr {cfg.peak_lr:.3g}, "
                             f"{len(train)} train / {len(val)} val images, {len(train.classes)} classes, "
                             f"budget {cfg.budget_s:.0f}s, {eval_at}")
        if self.world_size > 1:
            self.readout.message(f"data-parallel: {self.world_size} processes x batch {cfg.batch_size} = "
                                 f"{cfg.global_batch} images per step (the lr follows the global batch)")
        if not attempt:
            for text in plan_lines(self.plan, self.cfg, self.train_images):
                self.readout.message(text)
        for text in cost_lines(cfg, self.budget, self.device, net, params, self.train_images):
            self.readout.message(text)

    def maybe_log(self, state: Any, loss: torch.Tensor | None, flops_per_image: float,
                  check_finite: Callable[[int], None] | None) -> None:
        """The ``train`` line, if ``--log-every`` has passed since the last: images/s, TFLOP/s, MFU, the share of
        the interval spent waiting on data, memory, the epochs this pace projects. Reading the loss is the
        interval's one host sync; ``check_finite(step)`` (one process) raises there on a non-finite loss."""
        s, now = state, self.budget.elapsed
        interval = now - self.last_t
        if interval < self.cfg.log_every_s:
            return
        assert loss is not None
        loss_value = loss.item()
        if check_finite is not None:
            check_finite(s.step)
        ips = (s.images_seen - self.last_images) / interval  # over all ranks
        tflops = ips * flops_per_image / 1e12
        mfu = float(f"{tflops * 1e12 / (self.peak * self.world_size):.4g}") if self.peak else None
        self.emit("train", step=s.step, epoch=s.epoch, stage=s.stage, image_size=s.image_size,
                  batch_size=s.batch_size, images_per_sec=round(ips, 2), loss=round(loss_value, 5), lr=s.lr,
                  images_seen=s.images_seen, interval_s=round(interval, 3),
                  data_wait=round(min(1.0, self.wait_s / interval), 4), tflops=float(f"{tflops:.4g}"), mfu=mfu,
                  elapsed_s=round(now, 3),
                  # at this stage's pace (later stages are slower: an upper bound)
                  projected_epochs=round((s.images_seen + ips * self.budget.remaining) / self.train_images, 2),
                  **device_memory(self.device))
        if self.plan.timed and s.stage not in self._projected:
            self.project_plan(s.stage, s.image_size, ips)
        self.last_t, self.last_images, self.wait_s = now, s.images_seen, 0.0

    def project_plan(self, stage: int, image_size: int, ips: float) -> None:
        """The time-placed plan in epochs, from this stage's measured speed: other stages' speeds are scaled by
        image side, as the plan's time split assumes (logged once per stage, as a ``plan`` event)."""
        self._projected.add(stage)
        starts = (*self.plan.starts, 1.0)
        epochs = {}
        for k in range(self.plan.num_stages):
            seconds = (starts[k + 1] - starts[k]) * self.cfg.budget_s
            stage_ips = ips * image_size / self.plan.size_of(k)
            epochs[self.plan.size_of(k)] = round(seconds * stage_ips / self.train_images, 2)
        self.run_dir.log("plan", stage=stage, images_per_sec=round(ips, 2), projected_epochs=epochs,
                         elapsed_s=round(self.budget.elapsed, 3))
        self.readout.message("projected epochs per stage at this pace: "
                             + ", ".join(f"{size} px {n:g}" for size, n in epochs.items()))
