"""The training loop, top to bottom: build -> epochs of steps until the budget says stop -> final evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from model import build_model
from pipelines import Split, StageLoader, StageSpec
from trainer.budget import Budget
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.readout import Readout
from trainer.rundir import RunDir

EVAL_BATCH = 128


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0
    images_seen: int = 0
    epoch_progress: float = 0.0  # fraction of the current epoch done when the run stopped


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


def stage_spec(cfg: TrainConfig, device: torch.device, batch_size: int) -> StageSpec:
    gpu = device.type == "cuda"
    return StageSpec(image_size=cfg.image_size, batch_size=batch_size, device="gpu" if gpu else "cpu",
                     device_id=(device.index or 0) if gpu else None, num_threads=cfg.workers,
                     seed=cfg.seed, half=gpu)


def train(cfg: TrainConfig, train_split: Split, val_split: Split, run: RunDir, readout: Readout,
          budget: Budget) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast

    net = build_model(cfg.model, num_classes=len(train_split.classes), image_size=cfg.image_size,
                      act=cfg.act, drop_path=cfg.drop_path)
    net = net.to(device, memory_format=torch.channels_last)
    forward = torch.compile(net) if cfg.compile else net
    groups = param_groups_weight_decay(net, cfg.weight_decay, net.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    spec = stage_spec(cfg, device, cfg.batch_size)
    train_batches = StageLoader(train_split, spec, train=True, device=device)
    val_batches = StageLoader(val_split, replace(spec, batch_size=EVAL_BATCH), train=False, device=device)

    params = sum(p.numel() for p in net.parameters())
    run.log("start", model=cfg.model, params=params, device=str(device), amp=str(amp_dtype),
            image_size=cfg.image_size, train_images=len(train_split), val_images=len(val_split),
            steps_per_epoch=len(train_batches), elapsed_s=budget.elapsed)
    readout.message(f"{cfg.model} ({params / 1e6:.1f}M params) on {device}, amp {amp_dtype}, "
                    f"{len(train_split)} train / {len(val_split)} val images, {len(train_split.classes)} classes, "
                    f"{cfg.image_size} px, budget {cfg.budget_s:.0f}s")

    state = TrainState()
    lr = optimizer.param_groups[0]["lr"]
    step_s: float | None = None  # moving average of one step's wall time, data wait included
    last_eval: dict[str, float] | None = None
    net.train()
    last_log_t, last_log_images = budget.elapsed, state.images_seen
    while True:
        epoch_steps = 0
        t_prev = budget.elapsed
        out_of_time = False
        for images, labels in train_batches:
            if step_s is not None and not budget.can_fit(step_s):
                out_of_time = True
                break
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            epoch_steps += 1
            state.images_seen += labels.shape[0]

            now = budget.elapsed
            dt, t_prev = now - t_prev, now
            step_s = dt if step_s is None else 0.9 * step_s + 0.1 * dt
            if now - last_log_t >= cfg.log_every_s:
                loss_value = loss.item()  # the one host sync per log interval
                ips = (state.images_seen - last_log_images) / (now - last_log_t)
                fields = dict(step=state.step, epoch=state.epoch, image_size=cfg.image_size,
                              images_per_sec=round(ips, 2), loss=round(loss_value, 5), lr=lr, elapsed_s=round(now, 3))
                run.log("train", **fields)
                readout.update(**fields)
                last_log_t, last_log_images = now, state.images_seen
        if out_of_time:
            state.epoch_progress = epoch_steps / len(train_batches)
            break
        state.epoch += 1
        if cfg.eval_every and state.epoch % cfg.eval_every == 0:
            last_eval = _evaluate(net, val_batches, amp_dtype, state, cfg, run, readout, budget)
            if not budget.can_fit(step_s or 0.0):
                break
        else:
            last_eval = None

    train_s = budget.elapsed
    if last_eval is None or state.epoch_progress > 0:
        last_eval = _evaluate(net, val_batches, amp_dtype, state, cfg, run, readout, budget)
    train_batches.close()
    val_batches.close()
    summary = {
        "top1": last_eval["top1"], "top5": last_eval["top5"],
        "epochs": round(state.epoch + state.epoch_progress, 4), "steps": state.step,
        "images_seen": state.images_seen, "elapsed_s": round(budget.elapsed, 3), "train_s": round(train_s, 3),
        "budget_s": cfg.budget_s, "overshoot_s": round(budget.elapsed - cfg.budget_s, 3),
        "stop_reason": "budget", "model": cfg.model, "image_size": cfg.image_size, "params": params,
        "device": str(device), "state": asdict(state),
    }
    return summary


def _evaluate(net: nn.Module, val_batches: StageLoader, amp_dtype: torch.dtype | None, state: TrainState,
              cfg: TrainConfig, run: RunDir, readout: Readout, budget: Budget) -> dict[str, float]:
    result = evaluate(net, val_batches, amp_dtype)
    fields = dict(step=state.step, epoch=round(state.epoch + state.epoch_progress, 4), image_size=cfg.image_size,
                  top1=round(result["top1"], 5), top5=round(result["top5"], 5), eval_s=round(result["eval_s"], 3),
                  elapsed_s=round(budget.elapsed, 3))
    run.log("eval", **fields)
    readout.update(**fields)
    if readout.live:  # plain mode already printed the line
        readout.message(
            f"epoch {fields['epoch']}: val top1 {100 * result['top1']:.2f}%  top5 {100 * result['top5']:.2f}%"
        )
    return result
