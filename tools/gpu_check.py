"""Check and time the GPU path in one call; print a table of it all, and the issue's targets PASS or FAIL, last.

Usage (a CUDA machine with DALI; about 9 minutes on an H100, the three trainer runs most of it):
    python tools/gpu_check.py [--out DIR] [--sizes 32,64,...,224] [--steps 30] [--skip-runs] [--run-budget 100s]
                              [--time-limit 570]
A smoke test of the script itself on a CPU (graph columns "-", the tiny test model, 30s runs):
    python tools/gpu_check.py --device cpu --quick --sizes 32,64 --out /tmp/gpucheck-smoke

It times the product's own pieces (TrainStep, StageLoader, resize_for_stage, the trainer's command line) on the
demo dataset (built if missing), with the paper-ours recipe (--preset: its augmentation, drop path, interpolation),
the locality ViT-S (--model), bf16, a 1000-class head and batch 64 (--batch-size):
  per stage size   (the plan's sizes, 32..224 px, or --sizes)
                   the DALI train pipeline alone, without and with RandAugment (2 ops, magnitude 27); the training
                   step alone on one synthetic on-device batch (fp16 NHWC memory viewed as NCHW, as DALI hands it
                   over), one TrainStep run "eager" and one captured in a CUDA graph ("graph"), each moved from size
                   to size as the trainer moves its step; DeiT-S's captured step; the full loop (StageLoader batches
                   into the captured step): img/s, the share of its time blocked in the loader's next(), loop / step
                   alone, and the same loop with --data-handoff stream; PyTorch's peak GPU memory
  fast paths       vit-train --check-gpu as a user runs it (another process, first): which of the captured step,
                   the fused FFN and the GPU decoder work on this card, and each next to its fallback; its table is
                   printed before the timings' table
  tokens rows      --stage-batch tokens batches at 32 and 64 px, reading the pre-resized copies that
                   vit-prepare --max-size 64,128,full makes of the data (once, into DIR/demo-prepared):
                   pipeline alone, captured step alone, full loop, data wait
  trainer runs     python -m trainer --preset paper-ours --curriculum 32:32:1 --budget 100s --step graph, then
                   --step eager, then the eager run under `torchrun --standalone --nproc-per-node 1` (a process group
                   of one, DDP around the model, NCCL: the data-parallel path's own cost): top-1, elapsed vs budget,
                   stages reached, median img/s and data wait of the 'train' metrics lines, each stage's entry and
                   capture time ('stage_ready' lines)
  GPU tests        pytest -q tests/test_step_gpu.py tests/test_fused_ffn.py (noted if a file is absent)
and records the device, torch/DALI/timm versions and CPU cores. DIR/gpu_check.json is rewritten (atomically) after
each part, so a check cut short keeps what it measured; the runs' directories and logs are in DIR too. A test or
run that cannot fit in what is left of --time-limit is skipped (and killed should it overrun), so the table is
printed within it.

On a CPU the captured step does not exist: its columns show "-", and DeiT-S, the loop and the tokens rows run the
step eagerly (the table says so). Exit status 1 when a measurement, a run or the tests failed; the targets are
reported, not exit-coded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nvidia.dali
import timm
import torch

from pipelines import Split, StageLoader, StageSpec, index_dataset
from pipelines.demo_dataset import ensure_demo_dataset
from trainer.config import PATCH_SIZE, ConfigError, TrainConfig, parse_args
from trainer.curriculum import stage_batch_size
from trainer.data import stage_spec
from trainer.profile import time_batches
from trainer.rundir import read_events, write_json_atomic
from trainer.step import TrainStep, resolve_amp, resolve_step_mode

REPO = Path(__file__).resolve().parents[1]
DEIT = "deit_small_patch16_224"
RANDAUG = (2, 27)  # ops per image, magnitude on DALI's 0..30 scale: timm's m9, the paper's recipe
TOKENS_SIZES = (32, 64)
COPIES = "64,128,full"  # with --source-ratio 2: the 32-px stage reads the 64-px copy, the 64-px stage the 128-px one
NUM_CLASSES = 1000  # an ImageNet head for the timed steps; the demo's labels (0..9) are valid labels for it
RUN_CURRICULUM = "32:32:1"  # every stage in the first epochs of a short run, so the runs cross all stage entries
TEST_FILES = ("tests/test_step_gpu.py", "tests/test_fused_ffn.py")  # the tests that need a GPU to mean it
TEST_NAMES = " ".join(TEST_FILES)
END_RESERVE_S = 15  # kept back from --time-limit for the table and the JSON
TARGETS = {"loop_224": 3000.0, "loop_32": 12000.0, "loop_vs_step": 0.90, "data_wait": 0.05, "tokens": 30000.0,
           "top1_gap": 0.02, "ddp1": 0.97}


# -- timing ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    steps: int  # timed batches per measurement
    warmup: int  # batches run first and not timed (more for a step that has yet to settle)


class Waited:
    """Iterates ``batches`` and records how long each ``next()`` blocked: the loop's data wait, as the trainer
    counts it (``Trainer.run_epoch``)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = batches
        self.waits: list[float] = []

    def __iter__(self) -> Iterator:
        it = iter(self.batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def step_warmup(step: TrainStep, timing: Timing) -> int:
    # A captured step warms up and captures in its first settle_steps; one replay more keeps the capture's own
    # synchronisation out of the timed window.
    return max(timing.warmup, step.settle_steps + 1)


def pipeline_rate(loader: StageLoader, timing: Timing, device: torch.device) -> float:
    """Images/s of the pipeline alone: batches land on the device and nothing consumes them."""
    return time_batches(loader, timing.steps, timing.warmup, device)


def step_rate(step: TrainStep, size: int, batch: int, half: bool, timing: Timing, device: torch.device) -> float:
    """Images/s of ``step`` alone on one synthetic on-device batch laid out as the loader hands it over."""
    dtype = torch.float16 if half else torch.float32
    images = torch.randn(batch, size, size, 3, device=device, dtype=dtype).permute(0, 3, 1, 2)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    warmup = step_warmup(step, timing)
    # Erasing and mixup write into the batch: a fresh copy per step, as every loader batch is fresh.
    return time_batches([(images, labels)] * (warmup + timing.steps), timing.steps, warmup, device,
                        work=lambda x, y: step(x.clone(), y))


def loop_rate(loader: StageLoader, step: TrainStep, timing: Timing, device: torch.device) -> tuple[float, float]:
    """Images/s of loader batches fed into ``step``, and the share of that time spent blocked on the loader."""
    waited = Waited(loader)
    warmup = step_warmup(step, timing)
    ips = time_batches(waited, timing.steps, warmup, device, work=step)
    # time_batches starts its clock after the warm-up batch's work: the next fetch is the first one timed
    blocked = sum(waited.waits[warmup:warmup + timing.steps])
    total = timing.steps * loader.spec.batch_size / ips
    return ips, blocked / total


def reset_peak(device: torch.device) -> float | None:
    """Start a peak-memory window; returns the GiB PyTorch holds now (every model's weights and states)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None or value != value else round(value, digits)  # NaN: no JSON for it


# -- the parts ---------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """What every part needs, and the report it fills."""

    args: argparse.Namespace
    cfg: TrainConfig
    device: torch.device
    train: Split
    timing: Timing
    loop_mode: str  # the mode the loop, DeiT-S and the tokens rows run: "graph", or eager where it cannot be
    report: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds left of --time-limit, less what the table and the JSON need at the end."""
        return self.args.time_limit - (time.monotonic() - self.started) - END_RESERVE_S

    def say(self, what: str, result: Any) -> None:
        print(f"[{time.monotonic() - self.started:5.0f}s] {what}: {json.dumps(result)}", flush=True)

    def save(self) -> None:
        write_json_atomic(self.args.out / "gpu_check.json", self.report)

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one part; a failure is recorded and the check goes on (a GPU session is too short to rerun all)."""
        try:
            return fn()
        except Exception as e:  # reported in the table and the JSON; exit status 1
            self.failed.append(f"{name}: {type(e).__name__}: {e}")
            print(f"{name} FAILED:\n{traceback.format_exc()}", flush=True)
            return {"error": f"{type(e).__name__}: {e}"}

    def steps_for(self, model: str, mode: str, size: int) -> TrainStep:
        cfg = replace(self.cfg, model=model)
        return TrainStep.for_config(cfg, NUM_CLASSES, self.device, image_size=size, mode=mode)

    def spec(self, size: int, batch: int) -> StageSpec:
        return stage_spec(self.cfg, self.device, size, batch)  # the trainer's own spec for this stage


def size_row(check: Check, size: int, steps: dict[str, TrainStep]) -> dict[str, Any]:
    """Pipeline (plain and RandAugment), eager and captured step, the full loop, DeiT-S, at one size."""
    device, timing, batch = check.device, check.timing, check.args.batch_size
    row: dict[str, Any] = {"size": size, "batch": batch}
    spec = check.spec(size, batch)  # the recipe's own pipeline, what the loop reads
    for name, rand_augment in (("pipeline_ips", None), ("pipeline_ra_ips", RANDAUG)):
        loader = StageLoader(check.train, replace(spec, rand_augment=rand_augment), train=True, device=device)
        row[name] = _round(pipeline_rate(loader, timing, device))
        loader.close()

    for step in steps.values():  # before the memory window: the previous size's graphs and pools are freed
        step.move_to(size)
    eager = steps["eager"]
    row["eager_ips"] = _round(step_rate(eager, size, batch, spec.half, timing, device))
    eager.optimizer.zero_grad(set_to_none=True)  # its gradients are no part of the captured step's memory
    looped = steps.get("graph", eager)
    row["resident_gib"] = _round(reset_peak(device), 3)
    if "graph" in steps:
        row["graph_ips"] = _round(step_rate(looped, size, batch, spec.half, timing, device))
    handoffs = [("", spec)]
    if spec.device == "gpu" and spec.handoff != "stream":  # the opt-in --data-handoff stream, measured alike
        handoffs.append(("_stream", replace(spec, handoff="stream")))
    for suffix, loop_spec in handoffs:
        loader = StageLoader(check.train, loop_spec, train=True, device=device)
        ips, wait = loop_rate(loader, looped, timing, device)
        loader.close()
        row[f"loop{suffix}_ips"], row[f"data_wait{suffix}"] = _round(ips), _round(wait, 4)
    row["peak_gib"] = _round(peak_gib(device), 3)
    step_alone = row.get("graph_ips") if "graph" in steps else row["eager_ips"]
    row["loop_vs_step"] = _round(row["loop_ips"] / step_alone, 3) if row["loop_ips"] and step_alone else None
    if row.get("graph_ips") and row["eager_ips"]:
        row["graph_vs_eager"] = _round(row["graph_ips"] / row["eager_ips"], 3)
    row["deit_ips"] = _round(step_rate(steps["deit"], size, batch, spec.half, timing, device))
    return row


def prepared_copies(check: Check, data: Path) -> Path:
    """``data`` itself when it has pre-resized copies, else its copies made once by vit-prepare
    (a rerun finds the manifest and does nothing)."""
    if check.train.copies:
        return data
    from pipelines import prepare

    out = check.args.out / "demo-prepared"
    workers = check.args.workers or os.cpu_count() or 1
    start = time.monotonic()
    code = prepare.main([str(data), "--out", str(out), "--max-size", COPIES, "--workers", str(workers),
                         "--no-progress"])
    if code:
        raise RuntimeError(f"vit-prepare {data} --out {out} --max-size {COPIES} exited {code}")
    check.report["prepare_s"] = round(time.monotonic() - start, 1)
    return out


def tokens_row(check: Check, split: Split, size: int, step: TrainStep) -> dict[str, Any]:
    """--stage-batch tokens at one size, reading the copy the trainer would pick: pipeline, step, loop."""
    device, cfg = check.device, check.cfg
    batch = stage_batch_size(check.args.batch_size, size, cfg.image_size, "tokens", min(cfg.max_batch, len(split)))
    spec = check.spec(size, batch)
    loader = StageLoader(split, spec, train=True, device=device)
    row: dict[str, Any] = {"size": size, "batch": batch, "batches_per_epoch": len(loader)}
    row["pipeline_ips"] = _round(pipeline_rate(loader, check.timing, device))
    row["source_px"] = loader.source_px
    loader.close()
    step.move_to(size)
    row["resident_gib"] = _round(reset_peak(device), 3)
    row["step_ips"] = _round(step_rate(step, size, batch, spec.half, check.timing, device))
    loader = StageLoader(split, spec, train=True, device=device)  # a fresh epoch, as a stage starts one
    ips, wait = loop_rate(loader, step, check.timing, device)
    loader.close()
    row["loop_ips"], row["data_wait"], row["peak_gib"] = _round(ips), _round(wait, 4), _round(peak_gib(device), 3)
    row["loop_vs_step"] = _round(row["loop_ips"] / row["step_ips"], 3) if row["loop_ips"] and row["step_ips"] else None
    return row


def decode_check(check: Check, val: Split, size: int = 224) -> dict[str, float]:
    """Mean |GPU - CPU| of the val pipeline's first batch (normalized units): nvJPEG vs libjpeg rounding only."""
    gpu = StageSpec.on(check.device, image_size=size, batch_size=32)
    gpu = replace(gpu, half=False)  # compare float32 with float32
    cpu = replace(gpu, device="cpu", device_id=None)
    g_loader = StageLoader(val, gpu, train=False, device=check.device)
    c_loader = StageLoader(val, cpu, train=False, device=torch.device("cpu"))
    g, c = next(iter(g_loader)), next(iter(c_loader))
    g_loader.close()
    c_loader.close()
    if not torch.equal(g[1].cpu(), c[1]):
        raise RuntimeError("labels differ between the GPU and CPU val pipelines")
    return {"mean_abs_diff": round((g[0].float().cpu() - c[0]).abs().mean().item(), 5)}


TORCHRUN_X1 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]


def trainer_run(check: Check, data: Path, mode: str, name: str | None = None,
                torchrun: bool = False) -> dict[str, Any]:
    """One real run of the trainer as a subprocess, and what its summary.json and metrics.jsonl say. ``torchrun``:
    launched as `torchrun --nproc-per-node 1` (a process group of one, DDP around the model)."""
    name = name or mode
    args = check.args
    budget_s = check.cfg.budget_s  # --run-budget, parsed by the trainer's own parser in main
    if check.left() < budget_s + 30:  # its imports, first stage and final evaluation need some time too
        return {"step": mode, "skipped": f"{check.left():.0f}s left of --time-limit, the run needs over "
                                          f"{budget_s + 30:.0f}s"}
    timeout = min(args.run_timeout or int(2 * budget_s + 120), int(check.left()))
    run_dir = args.out / f"run-{name}"
    if run_dir.exists():  # the trainer resumes or refuses a used folder; this one is this check's own
        shutil.rmtree(run_dir)
    launcher = [*TORCHRUN_X1, "-m", "trainer"] if torchrun else [sys.executable, "-m", "trainer"]
    cmd = [*launcher, "--data", str(data), "--preset", "paper-ours", "--curriculum",
           RUN_CURRICULUM, "--budget", args.run_budget, "--device", args.device, "--out", str(run_dir),
           "--step", mode, "--log-every", "5", "--model", args.model]
    print("$", " ".join(cmd), flush=True)
    log = args.out / f"run-{name}.log"
    start = time.monotonic()
    result: dict[str, Any] = {"step": mode, "command": cmd, "log": str(log)}
    with open(log, "w") as f:
        try:
            result["exit_code"] = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                                 timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            result["exit_code"] = None
            result["error"] = f"killed after {timeout}s"
    result["wall_s"] = round(time.monotonic() - start, 1)
    if result["exit_code"] != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        result.setdefault("error", f"exit code {result['exit_code']}: " + " | ".join(tail))
        check.failed.append(f"trainer run {name} (--step {mode}): {result['error']}")
        return result
    summary = json.loads((run_dir / "summary.json").read_text())
    events = read_events(run_dir)
    trains = [e for e in events if e["event"] == "train"]
    result.update(top1=summary["top1"], elapsed_s=summary["elapsed_s"], budget_s=summary["budget_s"],
                  stages_reached=summary["stages_reached"], step_mode=summary.get("step_mode"),
                  epochs=summary["epochs"], steps=summary["steps"],
                  images_per_sec=_round(statistics.median(e["images_per_sec"] for e in trains)) if trains else None,
                  data_wait=_round(statistics.median(e["data_wait"] for e in trains), 4) if trains else None)
    result["stage_ready"] = [{k: e.get(k) for k in ("image_size", "entry_s", "capture_s", "settle_steps")}
                             for e in events if e["event"] == "stage_ready"]
    by_size: dict[int, list[float]] = {}
    for e in trains:
        by_size.setdefault(e["image_size"], []).append(e["images_per_sec"])
    result["stage_ips"] = {str(size): _round(statistics.median(v)) for size, v in by_size.items()}
    return result


def fast_path_check(check: Check, data: Path) -> dict[str, Any]:
    """``vit-train --check-gpu`` as a user runs it (a subprocess): which fast paths work on this card, its table."""
    a = check.args
    cmd = [sys.executable, "-m", "trainer", "--check-gpu", "--data", str(data), "--preset", a.preset, "--model",
           a.model, "--batch-size", str(a.batch_size), "--device", a.device, "--workers", str(a.workers)]
    print("$", " ".join(cmd), flush=True)
    timeout = max(1, min(180, int(check.left())))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        check.failed.append(f"vit-train --check-gpu: killed after {timeout}s")
        return {"status": "timeout", "table": ""}
    (a.out / "check_gpu.log").write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("size ")), len(lines))
    if proc.returncode != 0:
        check.failed.append(f"vit-train --check-gpu: exit code {proc.returncode}")
    return {"status": "passed" if proc.returncode == 0 else "failed", "exit_code": proc.returncode,
            "table": "\n".join(lines[start:])}


def gpu_tests(check: Check) -> dict[str, Any]:
    missing = [f for f in TEST_FILES if not (REPO / f).is_file()]
    if missing:
        return {"status": "absent", "last_line": f"{', '.join(missing)} does not exist (yet)"}
    timeout = min(check.args.test_timeout, int(check.left()))
    if timeout < 30:
        return {"status": "skipped", "last_line": f"{check.left():.0f}s left of --time-limit"}
    cmd = [sys.executable, "-m", "pytest", "-q", *TEST_FILES]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        check.failed.append(f"{TEST_NAMES}: killed after {timeout}s")
        return {"status": "timeout", "last_line": f"killed after {timeout}s"}
    (check.args.out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    status = "passed" if proc.returncode == 0 else "failed"
    if status == "failed":
        check.failed.append(f"{TEST_NAMES}: exit code {proc.returncode}")
    return {"status": status, "exit_code": proc.returncode, "last_line": lines[-1] if lines else "",
            "wall_s": round(time.monotonic() - start, 1)}


# -- targets and the table ---------------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets(report: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's targets, each with what was measured against it."""
    t = TARGETS
    rows = {r["size"]: r for r in report.get("sizes", []) if "error" not in r}
    out = []

    def loop_at(size: int, floor: float) -> None:
        r = rows.get(size)
        ok = None if r is None or report["batch_size"] != 64 else (r["loop_ips"] or 0) >= floor
        measured = f"{r['loop_ips']:.0f} img/s" if r and r["loop_ips"] is not None else "not measured"
        out.append({"target": f"full loop at batch 64, {size} px >= {floor:.0f} img/s", "measured": measured,
                    "result": _verdict(ok)})

    loop_at(224, t["loop_224"])
    loop_at(32, t["loop_32"])
    ratios = [r["loop_vs_step"] for r in rows.values() if r.get("loop_vs_step") is not None]
    waits = [r["data_wait"] for r in rows.values() if r.get("data_wait") is not None]
    complete = rows and len(ratios) == len(waits) == len(report.get("sizes", []))
    ok = (min(ratios) >= t["loop_vs_step"] and max(waits) <= t["data_wait"]) if complete else None
    out.append({"target": f"loop >= {t['loop_vs_step']:.2f} x {report['loop_mode']} step alone and data wait <= "
                          f"{100 * t['data_wait']:.0f}% at every size",
                "measured": f"min ratio {min(ratios):.2f}, max wait {100 * max(waits):.1f}%" if complete
                else "not measured at every size", "result": _verdict(ok)})
    tokens = {r["size"]: r for r in report.get("tokens", []) if "error" not in r}
    loops = [tokens[s]["loop_ips"] for s in TOKENS_SIZES if s in tokens and tokens[s].get("loop_ips") is not None]
    ok = min(loops) >= t["tokens"] if len(loops) == len(TOKENS_SIZES) else None
    out.append({"target": f"tokens rows (loop) >= {t['tokens']:.0f} img/s at 32 and 64 px",
                "measured": ", ".join(f"{v:.0f}" for v in loops) + " img/s" if loops else "not measured",
                "result": _verdict(ok)})
    runs = report.get("runs", {})
    graph, eager = runs.get("graph", {}), runs.get("eager", {})
    if "top1" in graph:
        ok = graph["elapsed_s"] <= graph["budget_s"]
        measured = f"{graph['elapsed_s']:.1f}s of {graph['budget_s']:.0f}s"
    else:
        ok, measured = None, "not run" if not runs or "skipped" in graph else "failed"
    out.append({"target": "graph run ends inside its budget", "measured": measured, "result": _verdict(ok)})
    if "top1" in graph and "top1" in eager:
        gap = graph["top1"] - eager["top1"]
        ok, measured = abs(gap) <= t["top1_gap"], f"{100 * graph['top1']:.2f}% vs {100 * eager['top1']:.2f}%"
    else:
        ok, measured = None, "not run" if not runs or "skipped" in graph or "skipped" in eager else "a run failed"
    out.append({"target": f"graph run top-1 within {100 * t['top1_gap']:.0f} points of the eager run",
                "measured": measured, "result": _verdict(ok)})
    ddp1 = runs.get("ddp1", {})
    # stage by stage (the two runs may reach different stages in the same budget): the median of the ratios
    common = sorted(set(ddp1.get("stage_ips", {})) & set(eager.get("stage_ips", {})), key=int)
    if common:
        ratios = [ddp1["stage_ips"][k] / eager["stage_ips"][k] for k in common]
        ratio = statistics.median(ratios)
        ok, measured = ratio >= t["ddp1"], (f"{ratio:.3f} (per stage " + ", ".join(
            f"{k} px {r:.3f}" for k, r in zip(common, ratios, strict=True)) + ")")
    else:
        ok, measured = None, "not run" if "skipped" in ddp1 or not ddp1 else "a run failed"
    out.append({"target": f"torchrun x1 (DDP) eager run >= {t['ddp1']:.2f} x the one-process eager run's img/s",
                "measured": measured, "result": _verdict(ok)})
    return out


def _cell(value: float | None, width: int, spec: str = ".0f", scale: float = 1.0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value * scale:>{width}{spec}}"


def table(report: dict[str, Any]) -> str:
    env, mode = report["env"], report["loop_mode"]
    lines = [f"{env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | DALI {env['dali']} | timm {env['timm']} | "
             f"{env['cpu_cores']} CPU cores",
             f"{report['model']}, preset {report['preset']}, amp {report['amp']}, batch {report['batch_size']}, "
             f"{report['steps']} timed steps per cell, {report['classes']}-class head, data {report['data']}"]
    if report.get("graph_note"):
        lines.append(f"no captured step here ({report['graph_note']}): DeiT-S, the loop and the tokens rows run "
                     f"{mode}")
    if "decode" in report:
        decode = report["decode"]
        lines.append("val pipeline at 224 px, GPU vs CPU decode: " + (f"mean |diff| {decode['mean_abs_diff']:.4f}"
                     if "mean_abs_diff" in decode else f"FAILED: {decode['error'][:100]}"))
    if "timings_error" in report:
        lines.append(f"timings FAILED: {report['timings_error'][:200]}")
    lines += ["", f"{'size':>4} {'pipeline':>9} {'+RandAug':>9} {'eager':>7} {'graph':>7} {'g/e':>5} "
                  f"{'DeiT-S ' + mode:>12} {'loop':>7} {'loop/step':>9} {'wait %':>6} {'peak GiB':>8} "
                  f"{'stream loop':>11} {'wait %':>6}",
              f"{'px':>4} {'img/s':>9} {'img/s':>9} {'img/s':>7} {'img/s':>7} {'':>5} {'img/s':>12} {'img/s':>7} "
              f"{'':>9} {'':>6} {'':>8} {'img/s':>11}"]
    for r in report.get("sizes", []):
        if "error" in r:
            lines.append(f"{r['size']:>4} FAILED: {r['error'][:100]}")
            continue
        lines.append(f"{r['size']:>4} {_cell(r['pipeline_ips'], 9)} {_cell(r['pipeline_ra_ips'], 9)} "
                     f"{_cell(r['eager_ips'], 7)} {_cell(r.get('graph_ips'), 7)} "
                     f"{_cell(r.get('graph_vs_eager'), 5, '.2f')} {_cell(r['deit_ips'], 12)} "
                     f"{_cell(r['loop_ips'], 7)} {_cell(r['loop_vs_step'], 9, '.2f')} "
                     f"{_cell(r['data_wait'], 6, '.1f', 100)} {_cell(r['peak_gib'], 8, '.2f')} "
                     f"{_cell(r.get('loop_stream_ips'), 11)} {_cell(r.get('data_wait_stream'), 6, '.1f', 100)}")
    lines.append("(loop/step: the full loop over the step alone in the loop's mode; peak: PyTorch's peak while the "
                 "captured step and the loops ran, every resident model's weights included; stream loop: the same "
                 "loop with --data-handoff stream)")
    prepared = f", prepared in {report['prepare_s']:.0f}s" if "prepare_s" in report else ""
    lines += ["", f"--stage-batch tokens, reading the pre-resized copies ({COPIES}{prepared}), step {mode}:",
              f"{'size':>4} {'batch':>5} {'copy px':>7} {'pipeline':>9} {'step':>7} {'loop':>7} {'loop/step':>9} "
              f"{'wait %':>6} {'peak GiB':>8}"]
    for r in report.get("tokens", []):
        if "error" in r:
            lines.append(f"{r['size']:>4} FAILED: {r['error'][:100]}")
            continue
        lines.append(f"{r['size']:>4} {r['batch']:>5} {r['source_px'] or 'full':>7} {_cell(r['pipeline_ips'], 9)} "
                     f"{_cell(r['step_ips'], 7)} {_cell(r['loop_ips'], 7)} {_cell(r['loop_vs_step'], 9, '.2f')} "
                     f"{_cell(r['data_wait'], 6, '.1f', 100)} {_cell(r['peak_gib'], 8, '.2f')}")
    runs = report.get("runs")
    lines.append("")
    if not runs:
        lines.append("trainer runs: skipped (--skip-runs)")
    else:
        lines += [f"trainer runs: --preset paper-ours --curriculum {RUN_CURRICULUM} --budget {report['run_budget']}"
                  + f" --model {report['model']}",
                  f"{'step':>6} {'ran':>6} {'top-1 %':>7} {'elapsed/budget s':>16} {'stages':>6} {'img/s':>7} "
                  f"{'wait %':>6} {'wall s':>6}"]
        for name, r in runs.items():
            if "skipped" in r:
                lines.append(f"{name:>6} skipped: {r['skipped']}")
                continue
            if "top1" not in r:
                lines.append(f"{name:>6} FAILED: {r.get('error', '?')[:100]}")
                continue
            lines.append(f"{name:>6} {r['step_mode']:>6} {100 * r['top1']:>7.2f} "
                         f"{r['elapsed_s']:>8.1f}/{r['budget_s']:<7.0f} {r['stages_reached']:>6} "
                         f"{_cell(r['images_per_sec'], 7)} {_cell(r['data_wait'], 6, '.1f', 100)} {r['wall_s']:>6.0f}")
            ready = "  ".join(f"{s['image_size']}:{s['entry_s']:.2f}/{s['capture_s']:.2f}" for s in r["stage_ready"])
            lines.append(f"{'':>6} stage_ready px:entry_s/capture_s  {ready}")
    tests = report.get("tests", {})
    lines += ["", f"{TEST_NAMES}: {tests.get('status', 'not run')} - {tests.get('last_line', '')}", "",
              "targets:"]
    for t in report.get("targets", []):
        lines.append(f"  {t['result']:<4}  {t['target']}: {t['measured']}")
    lines.append(f"\nwall {report.get('wall_s', 0):.0f}s; {report['out']}")
    if report.get("failed"):
        lines += ["FAILED parts:", *(f"  {f[:200]}" for f in report["failed"])]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------------


def parse_check_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--data", default=None, help="ImageNet-layout folder (default: the demo dataset, built if missing)")
    p.add_argument("--out", default="gpu-check", help="where gpu_check.json, the runs and the copies go")
    p.add_argument("--preset", default="paper-ours", help="the recipe the timed steps and pipelines use")
    p.add_argument("--model", default=None, help="the timed steps' and the runs' model (default "
                                                 "vit_local_small_patch16; vit_local_test_patch16 with --quick)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=1024, help="cap of the tokens rows' batch")
    p.add_argument("--workers", type=int, default=0, help="DALI CPU threads (0: one per core)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default: the plan's, 32..224)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 30; 2 with --quick)")
    p.add_argument("--skip-runs", action="store_true", help="no trainer runs")
    p.add_argument("--run-budget", default=None, help="the trainer runs' --budget (default 100s; 30s with --quick)")
    p.add_argument("--run-timeout", type=int, default=None,
                   help="seconds before a trainer run is killed (default: twice its budget + 120)")
    p.add_argument("--test-timeout", type=int, default=300, help="seconds before the GPU tests are killed")
    p.add_argument("--time-limit", type=float, default=570,
                   help="seconds for the whole check (default 570, under a 10-minute command limit): a test or run "
                        "that cannot fit what is left is skipped, or killed when it would overrun, and the table is "
                        "still printed")
    p.add_argument("--quick", action="store_true", help="a smoke test: few steps, the tiny test model, 30s runs")
    args = p.parse_args(argv)
    args.out = Path(args.out)
    args.steps = args.steps or (2 if args.quick else 30)
    # a short run on a slow CPU still needs its imports and first stage inside the budget, and a few metrics lines
    args.run_budget = args.run_budget or ("30s" if args.quick else "100s")
    args.model = args.model or ("vit_local_test_patch16" if args.quick else "vit_local_small_patch16")
    return args


def sweep(check: Check, sizes: list[int], copies: Path | None) -> None:
    """The per-size rows, then the tokens rows: in one scope, so that their models are freed on return."""
    report, loop_mode = check.report, check.loop_mode
    # One TrainStep per mode for the whole sweep, moved size to size as the trainer moves its one step.
    steps = {"eager": check.steps_for(check.cfg.model, "eager", sizes[0])}
    if loop_mode == "graph":
        steps["graph"] = check.steps_for(check.cfg.model, "graph", sizes[0])
    steps["deit"] = check.steps_for(DEIT, loop_mode, sizes[0])
    for size in sizes:
        row = check.part(f"{size} px", lambda size=size: size_row(check, size, steps))
        report["sizes"].append({"size": size, **row})
        check.save()
        check.say(f"{size} px", row)
    looped = steps.get("graph", steps["eager"])
    for name in [n for n in steps if steps[n] is not looped]:  # free the other models before the big batches
        steps.pop(name).prepare()
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()

    if copies is None:  # the preparation failed: recorded already
        return
    split, _ = index_dataset(copies)
    for size in TOKENS_SIZES:
        row = check.part(f"tokens {size} px", lambda size=size: tokens_row(check, split, size, looped))
        report["tokens"].append({"size": size, **row})
        check.save()
        check.say(f"tokens {size} px", row)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_check_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA device is available (use --device cpu for a smoke test)",
              file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else ensure_demo_dataset()
    flags = ["--data", str(data), "--preset", args.preset, "--model", args.model, "--batch-size",
             str(args.batch_size), "--max-batch", str(args.max_batch), "--device", args.device, "--amp", "bf16",
             "--step", "graph", "--workers", str(args.workers), "--budget", args.run_budget]
    try:
        cfg = parse_args(flags)  # the trainer's own checks, --run-budget's included, before any timing
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else cfg.profile_size_list()
        if any(s <= 0 or s % PATCH_SIZE for s in sizes):
            raise ConfigError(f"--sizes: every size must be a positive multiple of {PATCH_SIZE}, got {args.sizes}")
    except (ConfigError, ValueError) as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    train, val = index_dataset(data)
    device = torch.device(args.device)
    amp = resolve_amp(cfg.amp, device)
    loop_mode, graph_note = resolve_step_mode("graph", device, amp)
    torch.manual_seed(cfg.seed)
    check = Check(args, cfg, device, train, Timing(args.steps, 1 if args.quick else 3), loop_mode, started=started)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "dali": nvidia.dali.__version__,
           "timm": timm.__version__, "cpu_cores": os.cpu_count(), "python": sys.version.split()[0]}
    report = check.report
    report.update(env=env, model=cfg.model, preset=args.preset, amp=str(amp), batch_size=args.batch_size,
                  steps=args.steps, classes=NUM_CLASSES, data=str(data), train_images=len(train), sizes=[], tokens=[],
                  loop_mode=loop_mode, graph_note=graph_note, out=str(args.out.resolve()),
                  run_budget=args.run_budget, time_limit_s=args.time_limit, targets_wanted=TARGETS,
                  randaug=RANDAUG, recipe_randaug=cfg.randaug, mixup=cfg.mixup, cutmix=cfg.cutmix,
                  reprob=cfg.reprob, drop_path=cfg.drop_path, interp=cfg.interp)
    check.say("environment", env)
    # First, while no pipeline thread runs yet: the preparation forks its worker processes.
    copies = check.part("prepare copies", lambda: prepared_copies(check, data))
    # what a user's `vit-train --check-gpu` says of this card (another process: before this one holds the GPU)
    report["fast_paths"] = check.part("fast paths", lambda: fast_path_check(check, data))
    check.save()
    if not isinstance(copies, Path):
        report["tokens"].append({"size": TOKENS_SIZES[0], **copies})
        copies = None
    if device.type == "cuda":
        report["decode"] = check.part("decode check", lambda: decode_check(check, val))

    swept = check.part("timings", lambda: sweep(check, sizes, copies))
    if swept:  # the steps could not even be built
        report["timings_error"] = swept["error"]
    gc.collect()  # the sweep's models are gone: the tests and the runs are other processes on the same card
    if device.type == "cuda":
        torch.cuda.empty_cache()

    report["tests"] = check.part("GPU tests", lambda: gpu_tests(check))
    check.save()
    check.say("tests", report["tests"])
    report["runs"] = {}
    if not args.skip_runs:
        # the last: the eager run again under `torchrun --nproc-per-node 1` (DDP of one; NCCL on CUDA)
        for name, mode, torchrun in (("graph", "graph", False), ("eager", "eager", False), ("ddp1", "eager", True)):
            run = check.part(f"trainer run {name}", lambda name=name, mode=mode, torchrun=torchrun:
                             trainer_run(check, data, mode, name, torchrun))
            report["runs"][name] = run
            check.save()
            check.say(f"run {name}", {k: v for k, v in run.items() if k != "command"})

    report["targets"] = targets(report)
    report["failed"] = check.failed
    report["wall_s"] = round(time.monotonic() - started, 1)
    check.save()
    print()
    if report.get("fast_paths", {}).get("table"):
        print("vit-train --check-gpu:")
        print(report["fast_paths"]["table"])
        print()
    print(table(report))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
