"""`vit-train --profile`: where the time goes at each stage size — pipeline alone, model step alone, full loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from model.flops import train_flops
from pipelines import Split, StageLoader
from trainer.config import TrainConfig
from trainer.data import stage_spec
from trainer.hardware import peak_flops
from trainer.rundir import write_json_atomic
from trainer.step import TrainStep, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def time_batches(batches, steps: int, warmup: int, device: torch.device, work=None) -> float:
    """Images/s over ``steps`` batches after ``warmup``; ``work(images, labels)`` runs on each if given."""
    done, images_timed, start = 0, 0, 0.0
    while done < warmup + steps:
        for images, labels in batches:
            if work is not None:
                work(images, labels)
            done += 1
            if done == warmup:
                _sync(device)
                start = time.perf_counter()
            elif done > warmup:
                images_timed += labels.shape[0]
            if done == warmup + steps:
                break
    _sync(device)
    return _rate(images_timed, time.perf_counter() - start)


def _advice(bound: str, pipeline: float, loop: float, model: float, device: torch.device) -> str:
    if bound == "data":
        return ("data-bound: more pipeline threads (--workers), pre-resized copies of the data "
                "(vit-prepare --max-size 96,192,full), or lighter augmentation (--randaug)")
    if loop < 0.9 * min(pipeline, model):
        if device.type == "cpu":
            return "the pipeline and the model share the CPU cores: a GPU, or fewer --workers"
        return "loop overhead: check the data-wait column and host syncs; try --step graph"
    return "compute-bound: a larger batch (--stage-batch tokens); --step graph or compile to cut launch overhead"


def profile(cfg: TrainConfig, train_split: Split, out: Path, sizes: list[int], steps: int = 20,
            warmup: int = 3, say=print) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    step = TrainStep.for_config(cfg, len(train_split.classes), device, image_size=sizes[0])
    warmup = max(warmup, step.settle_steps + 1)  # a captured step's warm-up and capture are not timed
    peak = peak_flops(device)
    rows = []
    for size in sizes:
        step.move_to(size)  # the trainer's stage change: a captured step is recaptured at the new shape
        spec = stage_spec(cfg, device, size, cfg.batch_size)
        loader = StageLoader(train_split, spec, train=True, device=device)
        pipeline_ips = time_batches(loader, steps, warmup, device)
        # the model alone: one synthetic on-device batch, as the pipeline would hand it over (NHWC, channels-last)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.randn(cfg.batch_size, size, size, 3, device=device, dtype=dtype).permute(0, 3, 1, 2)
        y = torch.randint(0, len(train_split.classes), (cfg.batch_size,), device=device)
        synthetic = [(x, y)] * (steps + warmup)
        model_ips = time_batches(synthetic, steps, warmup, device, work=lambda i, t: step(i.clone(), t))
        loader.close()
        loader = StageLoader(train_split, spec, train=True, device=device)  # a fresh epoch for the loop
        loop_ips = time_batches(loader, steps, warmup, device, work=step)
        loader.close()
        flops = train_flops(step.net, size)
        bound = "data" if pipeline_ips < model_ips else "compute"
        rows.append({"image_size": size, "batch_size": cfg.batch_size, "pipeline_ips": round(pipeline_ips, 1),
                     "model_ips": round(model_ips, 1), "loop_ips": round(loop_ips, 1), "bound": bound,
                     "loop_tflops": float(f"{loop_ips * flops / 1e12:.4g}"),
                     "loop_mfu": float(f"{loop_ips * flops / peak:.4g}") if peak else None,
                     "advice": _advice(bound, pipeline_ips, loop_ips, model_ips, device)})
        say(f"{size:>4} px: pipeline {pipeline_ips:8.0f} img/s, model {model_ips:8.0f}, loop {loop_ips:8.0f} "
            f"-> {bound}-bound")

    # A trace of a few full-loop steps at the last size, for Perfetto or TensorBoard.
    loader = StageLoader(train_split, stage_spec(cfg, device, sizes[-1], cfg.batch_size), train=True, device=device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace = out / "trace.json"
    with torch.profiler.profile(activities=activities) as prof:
        time_batches(loader, min(steps, 5), 1, device, work=step)
    prof.export_chrome_trace(str(trace))
    loader.close()

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": cfg.model, "amp": str(step.amp), "step_mode": step.mode, "steps": steps, "warmup": warmup,
              "rows": rows, "trace": trace.name}
    write_json_atomic(out / "profile.json", report)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} on {report['device']}, amp {report['amp']}, step {report.get('step_mode', 'eager')}, "
             f"{report['steps']} timed steps per cell",
             f"{'size':>5} {'batch':>5} {'pipeline img/s':>15} {'model img/s':>12} {'loop img/s':>11} "
             f"{'TFLOP/s':>8} {'MFU':>6} {'bound':>8}  what to try"]
    for r in report["rows"]:
        mfu = f"{100 * r['loop_mfu']:.1f}%" if r["loop_mfu"] is not None else "-"
        lines.append(f"{r['image_size']:>5} {r['batch_size']:>5} {r['pipeline_ips']:>15.0f} {r['model_ips']:>12.0f} "
                     f"{r['loop_ips']:>11.0f} {r['loop_tflops']:>8.3g} {mfu:>6} {r['bound']:>8}  {r['advice']}")
    return "\n".join(lines)

