"""Benchmarks behind BENCHMARKS.md; each prints a compact table and the command that produced it.

    python tools/bench.py curriculum [--rebuilds 20] [--data DIR] [--device cpu|cuda]
        Rebuilds the train loader (cycling through the curriculum sizes 32..224) and reports host RSS growth
        after the first cycle and the mean rebuild time: a stage change must not leak pipelines or pool memory.
    python tools/bench.py pipeline [--workers 2] [--repeats 3] [--device cpu|cuda]
        Our DALI train pipeline vs a torch DataLoader with torchvision's ImageFolder + RandomResizedCrop + flip +
        normalize, same images, same number of CPU workers/threads, at 32, 64, 128, 224 px: images/s and ratio.
    python tools/bench.py model [--device cpu|cuda] [--step eager|graph|compile] [--batch-size 8] [--repeats 3]
                                [--fused-ffn auto|on|off] [--sizes 32,64,128,224]
        The product's training step (trainer/step.py's TrainStep: forward, loss, backward, AdamW, as the trainer
        builds it) of the locality ViT-S vs timm's DeiT-S at 32..224 px; --step graph needs --device cuda.
    python tools/bench.py fused [--batch-size 256] [--size 224] [--curve-steps 200] [--device cuda]
        The fused locality FFN (model/fused_ffn.py) alone against PyTorch's ops for the same middle (h-swish,
        channels-last depth-wise conv, h-swish) at ViT-S's hidden width, forward and forward+backward, bf16; then
        the demo's model trained --curve-steps steps from one seed with the kernel on and off: both loss curves.
        On the CPU only under TRITON_INTERPRET=1, as a smoke test of the script (no meaningful times).
    python tools/bench.py loop [--device cpu|cuda] [--step auto|eager|graph|compile] [--model M] [--size S]
                               [--seconds 30]
        The full training loop on synthetic on-device batches vs the bare step (the trainer's own TrainStep): the
        loop's own cost.
    python tools/bench.py ddp [--device cpu|cuda] [--step eager|compile] [--seconds 60] [--repeats 2]
        The trainer on the demo data as one plain process and as `torchrun --nproc-per-node 1` (a process group of
        one, DDP around the model: NCCL on CUDA, gloo on the CPU), alternated, same flags: the steady img/s of each
        and their ratio, the data-parallel path's own overhead.
    python tools/bench.py small-images [--workers 2] [--repeats 3] [--copy-sizes 64,128] [--source-ratio 2]
        The train pipeline at 32 and 64 px reading ImageNet-sized JPEGs (375-500 px sides) vs reading the smallest
        pre-resized copy whose shorter side is at least source-ratio x the stage size: what --max-size saves.
    python tools/bench.py prepare [--workers 2] [--repeats 3] [--max-sizes full 256 64,128,full]
        vit-prepare on ImageNet-sized JPEGs: images/s and bytes written per --max-size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from pipelines import IMAGENET_MEAN, IMAGENET_STD, StageLoader, StageSpec, index_dataset
from pipelines.demo_dataset import ensure_demo_dataset
from trainer.profile import time_batches
from trainer.rundir import read_events

CPU = torch.device("cpu")


def rss_mb() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bench_curriculum(args: argparse.Namespace) -> None:
    data = Path(args.data) if args.data else ensure_demo_dataset()
    train, _ = index_dataset(data)
    gpu = args.device == "cuda"
    device = torch.device(args.device)
    sizes = [32, 64, 96, 128, 160, 192, 224]
    spec = StageSpec.on(device, image_size=sizes[0], batch_size=args.batch_size, num_threads=args.workers)
    loader = StageLoader(train, spec, train=True, device=device)
    next(iter(loader))  # first build: libraries and pools warm up, excluded from the growth figure
    gc.collect()
    rss0 = rss_mb()
    dev0 = _device_used_mb() if gpu else 0.0
    times, rss = [], []
    for i in range(args.rebuilds):
        size = sizes[(i + 1) % len(sizes)]
        start = time.perf_counter()
        loader.set_stage(dataclasses.replace(spec, image_size=size))
        times.append(time.perf_counter() - start)
        for n, _ in enumerate(loader):  # one short "epoch" at this stage
            if n + 1 >= args.batches:
                break
        gc.collect()
        rss.append(rss_mb())
        if args.verbose:
            print(f"rebuild {i + 1:>3}: {size:>3} px in {times[-1]:.3f}s, RSS {rss[-1]:.0f} MB", flush=True)
    loader.close()
    # Growth after one full cycle of sizes: the first cycle legitimately grows buffers and pools to the largest
    # size; a leak shows as growth from the end of the first cycle to the end of the last.
    cycle = len(sizes)
    growth = rss[-1] - rss[min(cycle, len(rss)) - 1]
    print(f"\n$ python tools/bench.py curriculum --rebuilds {args.rebuilds} --device {args.device} "
          f"--batch-size {args.batch_size} --batches {args.batches}")
    print(f"{'rebuilds':>8} {'mean rebuild s':>15} {'max rebuild s':>14} {'RSS first MB':>13} "
          f"{'RSS after cycle 1':>18} {'RSS end MB':>11} {'RSS max MB':>11} {'growth MB':>10}")
    print(f"{args.rebuilds:>8} {statistics.mean(times):>15.3f} {max(times):>14.3f} {rss0:>13.0f} "
          f"{rss[cycle - 1]:>18.0f} {rss[-1]:>11.0f} {max(rss):>11.0f} {growth:>10.1f}")
    print("growth: RSS at the end minus RSS after the first cycle through the sizes (32..224 px)")
    if gpu:  # DALI's pools are not torch's: read the device-wide figure
        print(f"GPU memory in use (whole device): {dev0:.0f} MB after the first build -> {_device_used_mb():.0f} MB "
              "after the last rebuild and close")


def _device_used_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


SIZES = (32, 64, 128, 224)


def _median_of(repeats: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeats))


def bench_pipeline(args: argparse.Namespace) -> None:
    """DALI vs a DataLoader: on the CPU both decode on the same cores; with --device cuda DALI decodes on the GPU
    ("mixed") and the DataLoader's batches are copied to the GPU (pinned, non-blocking), as a training loop would."""
    from torchvision import datasets, transforms

    data = Path(args.data) if args.data else ensure_demo_dataset()
    train, _ = index_dataset(data)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    rows = []
    for size in SIZES:
        spec = StageSpec.on(device, image_size=size, batch_size=args.batch_size, num_threads=args.workers)

        def dali(spec: StageSpec = spec) -> float:
            loader = StageLoader(train, spec, train=True, device=device)
            ips = time_batches(loader, args.batches, 2, device)
            loader.close()
            return ips

        tf = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        folder = datasets.ImageFolder(str(data / "train"), transform=tf)

        def to_device(images: torch.Tensor, labels: torch.Tensor) -> None:
            images.to(device, non_blocking=True)
            labels.to(device, non_blocking=True)

        def torchvision_loader(folder: datasets.ImageFolder = folder) -> float:
            loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True,
                                                 num_workers=args.workers, drop_last=True, persistent_workers=False,
                                                 pin_memory=gpu)
            return time_batches(loader, args.batches, 2, device, work=to_device if gpu else None)

        ours, theirs = _median_of(args.repeats, dali), _median_of(args.repeats, torchvision_loader)
        rows.append((size, ours, theirs))
        print(f"{size} px: DALI {ours:.0f} img/s, DataLoader {theirs:.0f} img/s", flush=True)
    _ratio_table(f"python tools/bench.py pipeline --device {args.device} --workers {args.workers} --batch-size "
                 f"{args.batch_size} --batches {args.batches} --repeats {args.repeats}   (medians of {args.repeats})",
                 ("DALI img/s", "DataLoader img/s"), rows)


def _ratio_table(command: str, columns: tuple[str, str], rows: list[tuple[int, float, float]]) -> None:
    """The command, then one row per size: ours, theirs and ours/theirs."""
    print(f"\n$ {command}")
    print(f"{'size':>5} {columns[0]:>18} {columns[1]:>18} {'ratio':>6}")
    for size, ours, theirs in rows:
        print(f"{size:>5} {ours:>18.0f} {theirs:>18.0f} {ours / theirs:>6.2f}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _amp_name(amp: torch.dtype | None) -> str:
    return str(amp).removeprefix("torch.") if amp is not None else "off"


def bench_model(args: argparse.Namespace) -> None:
    """The trainer's own step (``TrainStep.for_config``, default flags: no batch augmentation, the model's
    drop-path, AdamW; bf16 autocast on CUDA) on one synthetic batch in the pipeline's layout, per model and size."""
    from trainer.config import parse_args
    from trainer.step import TrainStep, resolve_amp, resolve_step_mode

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench model: --device cuda, but no CUDA device is available")
    if args.step == "graph" and device.type != "cuda":
        raise SystemExit("bench model: --step graph captures the step in a CUDA graph; use --device cuda "
                         "(on the CPU: --step eager or compile)")
    names = ("vit_local_small_patch16", "deit_small_patch16_224")
    flags = ["--data", "synthetic", "--no-curriculum", "--batch-size", str(args.batch_size), "--device", args.device,
             "--step", args.step, "--min-lr", "0",  # no schedule here: the floor need not fit a small batch's lr
             "--fused-ffn", args.fused_ffn]
    amp = resolve_amp(parse_args(flags).amp, device)
    mode, note = resolve_step_mode(args.step, device, amp)  # graph with fp16 runs eagerly, as in the trainer
    if note:
        print(note, flush=True)
    rows = []
    for size in args.sizes:
        times = {}
        for name in names:
            cfg = parse_args([*flags, "--model", name, "--image-size", str(size)]
                             + (["--fused-ffn", "auto"] if name.startswith("deit") else []))
            step = TrainStep.for_config(cfg, 1000, device, image_size=size, mode=mode)
            # one batch as the pipeline hands it over: NHWC memory (a channels-last NCHW view), fp16 on CUDA; the
            # default flags have no batch augmentation, so nothing modifies it in place between steps
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            x = torch.randn(args.batch_size, size, size, 3, device=device, dtype=dtype).permute(0, 3, 1, 2)
            y = torch.randint(0, 1000, (args.batch_size,), device=device)

            def timed(step: TrainStep = step, x: torch.Tensor = x, y: torch.Tensor = y) -> float:
                step.synchronize()
                start = time.perf_counter()
                step(x, y)
                step.synchronize()
                return time.perf_counter() - start

            for _ in range(step.settle_steps + 1):  # compile / warm-up and capture, then one steady step
                step(x, y)
            if step.settling:
                raise RuntimeError(f"bench model: {name} at {size} px has not settled after its warm-up")
            times[name] = _median_of(args.repeats, timed)
            del step, x, y, timed
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append((size, times[names[0]], times[names[1]]))
        print(f"{size} px: ours {rows[-1][1] * 1e3:.0f} ms, DeiT-S {rows[-1][2] * 1e3:.0f} ms", flush=True)
    _ratio_table(f"python tools/bench.py model --device {args.device} --step {args.step} --batch-size "
                 f"{args.batch_size} --repeats {args.repeats} --fused-ffn {args.fused_ffn} --sizes "
                 f"{','.join(map(str, args.sizes))}   (median step time of "
                 f"{args.repeats}, {_device_name(device)}, {mode} step, amp {_amp_name(amp)})",
                 ("locality ViT-S ms", "DeiT-S ms"),
                 [(size, ours * 1e3, deit * 1e3) for size, ours, deit in rows])


def _device_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, the wall clock elsewhere)."""
    def once() -> float:
        if device.type != "cuda":
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    for _ in range(warmup):
        fn()
    return _median_of(repeats, once)


def bench_fused(args: argparse.Namespace) -> None:
    """The fused middle of the locality FFN against PyTorch's ops, alone; then loss curves with it on and off."""
    from model import fused_ffn as ff

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench fused: --device cuda, but no CUDA device is available")
    if device.type == "cpu" and not ff.interpreting():
        raise SystemExit("bench fused: the kernels run on CUDA; on the CPU set TRITON_INTERPRET=1 (a smoke test)")
    grid = args.size // 16
    c = 4 * 384  # ViT-S's hidden width
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h = torch.randn(args.batch_size, 1 + grid * grid, c, device=device, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(c, 1, 3, 3, device=device)).requires_grad_()
    g = torch.randn_like(h)

    def pytorch_path() -> torch.Tensor:  # what LocalityFeedForward runs unfused, on its patch rows
        return ff.unfused(h[:, 1:], w, (grid, grid))

    def fused() -> torch.Tensor:
        return ff.locality_dwconv(h, w, grid, grid)

    rows = []
    for name, fn in (("PyTorch ops", pytorch_path), ("fused", fused)):
        with torch.no_grad():
            forward = _device_ms(fn, device, args.repeats)

        def both(fn=fn) -> None:
            out = fn()
            out.backward(g[:, -out.shape[1]:])

        rows.append((name, forward, _device_ms(both, device, args.repeats)))
    shape = f"({args.batch_size}, 1 + {grid}x{grid}, {c}) {str(dtype).removeprefix('torch.')}"
    print(f"\n$ python tools/bench.py fused --batch-size {args.batch_size} --size {args.size} --device {args.device}"
          f"   (median of {args.repeats}, {_device_name(device)}, {shape})")
    print(f"{'':>12} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for name, forward, both_ms in rows:
        print(f"{name:>12} {forward:>11.3f} {both_ms:>11.3f}")
    print(f"{'ratio':>12} {rows[1][1] / rows[0][1]:>11.2f} {rows[1][2] / rows[0][2]:>11.2f}")
    if args.curve_steps:
        _fused_curves(args, device)


def _fused_curves(args: argparse.Namespace, device: torch.device) -> None:
    """The demo's model, --curve-steps steps from one seed, the same batches (the DALI pipeline rebuilt with the
    same seed), the kernel on and off: the two loss curves, printed every tenth of the way."""
    from model.locality_vit import set_fused
    from pipelines import index_dataset
    from trainer.config import parse_args
    from trainer.data import stage_spec
    from trainer.step import TrainStep

    cfg = parse_args(["--data", "demo", "--no-curriculum", "--device", device.type, "--step", args.curve_step,
                      "--fused-ffn", "off"] + (["--model", args.curve_model] if args.curve_model else [])
                     + (["--batch-size", str(args.curve_batch_size)] if args.curve_batch_size else []))
    train, _ = index_dataset(ensure_demo_dataset())
    curves = {}
    for on in (False, True):
        torch.manual_seed(cfg.seed)
        step = TrainStep.for_config(cfg, len(train.classes), device, image_size=cfg.image_size)
        set_fused(step.net, on)
        loader = StageLoader(train, stage_spec(cfg, device, cfg.image_size, cfg.batch_size), train=True,
                             device=device)
        losses: list[float] = []
        while len(losses) < args.curve_steps:
            for images, labels in loader:
                losses.append(float(step(images, labels, lr=cfg.peak_lr)))
                if len(losses) == args.curve_steps:
                    break
        loader.close()
        curves[on] = losses
        del step
    off, on = curves[False], curves[True]
    tail = max(1, len(off) // 4)
    print(f"\n{cfg.model} at {cfg.image_size} px, batch {cfg.batch_size}, {args.curve_step} step, seed {cfg.seed}: "
          f"loss with the fused FFN off / on")
    for k in range(0, len(off), max(1, len(off) // 10)):
        print(f"  step {k + 1:>4}: {off[k]:.4f} / {on[k]:.4f}")
    mean_off, mean_on = statistics.mean(off[-tail:]), statistics.mean(on[-tail:])
    print(f"  mean of the last {tail} steps: {mean_off:.4f} / {mean_on:.4f} ({100 * (mean_on / mean_off - 1):+.2f}%); "
          f"largest step-wise difference {max(abs(a - b) for a, b in zip(off, on, strict=True)):.4f}")


def _synthetic_loop(args: argparse.Namespace, log_every: float):
    """The trainer's config and a loop runner on synthetic on-device batches (no files, no decode): run(out,
    tracking) trains one budget into the run directory ``out`` and returns its steady img/s."""
    from rich.console import Console

    from pipelines import Split
    from pipelines.synthetic import SyntheticLoader
    from trainer.budget import Budget
    from trainer.config import parse_args
    from trainer.loop import train
    from trainer.readout import Readout
    from trainer.rundir import RunDir

    flags = ["--data", "synthetic", "--model", args.model, "--image-size", str(args.size), "--no-curriculum",
             "--batch-size", str(args.batch_size), "--eval-every", "0", "--device", args.device,
             "--budget", f"{args.seconds}s", "--log-every", f"{log_every:g}", "--step", args.step]
    cfg = parse_args(flags)
    steps_per_epoch = 50
    fake = Split(root=Path("synthetic"), files=("x",) * (steps_per_epoch * args.batch_size),
                 labels=(0,) * (steps_per_epoch * args.batch_size), classes=tuple(str(i) for i in range(1000)))

    def synthetic(split, spec, *, train: bool, device: torch.device, on_fallback=None) -> SyntheticLoader:
        return SyntheticLoader(len(split.classes), spec, steps_per_epoch=steps_per_epoch if train else 1,
                               device=device)

    def run(out: Path, tracking=None) -> float:
        run_dir = RunDir(out, tracking=tracking)
        run_dir.write_config(dataclasses.asdict(cfg))
        budget = Budget(cfg.budget_s)
        readout = Readout(cfg.budget_s, clock=lambda b=budget: b.elapsed, live=False,
                          console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
        try:
            run_dir.write_summary(train(cfg, fake, fake, run_dir, readout, budget, loader=synthetic))
        finally:
            run_dir.close()
        return _steady_rate(out)  # the intervals after the first (model build, FLOPs, warm-up)

    return cfg, run


def bench_loop(args: argparse.Namespace) -> None:
    """The full training loop (schedule, budget checks, metrics, checkpoints) on synthetic on-device batches vs
    the bare step of the same model and batch: what the loop's own machinery costs."""
    import tempfile

    from pipelines.synthetic import SyntheticLoader
    from trainer.step import TrainStep

    device = torch.device(args.device)
    cfg, run = _synthetic_loop(args, min(5.0, args.seconds / 6))
    loops, bares = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            loops.append(run(Path(tmp) / "run"))
        # the bare step: the trainer's own factory, mode resolved from the same flags (--step, --amp)
        step = TrainStep.for_config(cfg, 1000, device, image_size=args.size)
        warmup = max(3, step.settle_steps + 1)  # compile, or a graph's warm-up and capture, are not timed
        spec = StageSpec.on(device, image_size=args.size, batch_size=args.batch_size)
        batches = SyntheticLoader(1000, spec, steps_per_epoch=args.steps + warmup, device=device)
        bares.append(time_batches(batches, args.steps, warmup, device, work=step))
        mode = step.mode
        del step
    loop, bare = statistics.median(loops), statistics.median(bares)
    print(f"\n$ python tools/bench.py loop --model {args.model} --size {args.size} --batch-size {args.batch_size} "
          f"--seconds {args.seconds} --device {args.device} --step {args.step}   (medians of {args.repeats}; "
          f"{mode} step)")
    print(f"{'full loop img/s':>16} {'bare step img/s':>16} {'ratio':>6}")
    print(f"{loop:>16.0f} {bare:>16.0f} {loop / bare:>6.2f}")


def bench_track(args: argparse.Namespace) -> None:
    """The loop with the trackers asked for (W&B offline, MLflow in a local SQLite store, TensorBoard) against
    the same loop with none, alternated: what tracking costs a training step (the target: a ratio of 0.99 or more)."""
    import tempfile

    from trainer.track import Tracking

    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    _, run = _synthetic_loop(args, args.log_every)
    rates: dict[str, list[float]] = {"none": [], args.track: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in rates:  # alternated, so drift in the machine hits both alike
                out = Path(tmp) / f"{i}-{name.replace(',', '-')}"
                tracking = None if name == "none" else (lambda path: Tracking(args.track, path, "bench", False))
                rates[name].append(run(out, tracking))
                print(f"repeat {i}: trackers {name}: {rates[name][-1]:.1f} img/s", flush=True)
    plain, tracked = (statistics.median(r) for r in rates.values())
    print(f"\n$ python tools/bench.py track --track {args.track} --model {args.model} --size {args.size} "
          f"--batch-size {args.batch_size} --seconds {args.seconds} --log-every {args.log_every:g} --device "
          f"{args.device} --repeats {args.repeats}   (medians; {_device_name(torch.device(args.device))})")
    print(f"{'no trackers img/s':>18} {'with trackers img/s':>20} {'ratio':>6}")
    print(f"{plain:>18.1f} {tracked:>20.1f} {tracked / plain:>6.3f}")


def _steady_rate(run: Path) -> float:
    """Median img/s of a run's metrics intervals after the first (which holds start-up and the first compile)."""
    rates = [e["images_per_sec"] for e in read_events(run) if e["event"] == "train"][1:]
    if not rates:
        raise SystemExit(f"bench: fewer than two metrics intervals in {run}; raise --seconds")
    return statistics.median(rates)


def bench_wds(args: argparse.Namespace) -> None:
    """The training pipeline reading WebDataset shards (DALI's webdataset reader) against the same images as files
    (its file reader): the demo's train split, converted once into shards of 500 in a temporary folder."""
    import tempfile

    from pipelines import open_dataset
    from pipelines.wds import write_shards

    folder, _ = index_dataset(ensure_demo_dataset())
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VITBUDGET_CACHE"] = tmp  # the shards' index, made here and dropped after
        write_shards(folder, Path(tmp) / "shards", "demo-train", per_shard=500)
        _, val = index_dataset(ensure_demo_dataset())
        write_shards(val, Path(tmp) / "shards", "demo-val", per_shard=500)
        shards, _ = open_dataset(f"wds:{tmp}/shards")
        for size in args.sizes:
            spec = StageSpec.on(device, image_size=size, batch_size=args.batch_size, num_threads=args.workers)

            def rate(split, spec: StageSpec = spec) -> float:
                loader = StageLoader(split, spec, train=True, device=device)
                ips = time_batches(loader, args.batches, 2, device)
                loader.close()
                return ips

            wds, files = _median_of(args.repeats, lambda: rate(shards)), _median_of(args.repeats, lambda: rate(folder))
            rows.append((size, wds, files))
            print(f"{size} px: webdataset {wds:.0f} img/s, files {files:.0f} img/s", flush=True)
    _ratio_table(f"python tools/bench.py wds --device {args.device} --workers {args.workers} --batch-size "
                 f"{args.batch_size} --batches {args.batches} --repeats {args.repeats}   (medians of {args.repeats})",
                 ("webdataset img/s", "file reader img/s"), rows)


def bench_eval(args: argparse.Namespace) -> None:
    """vit-eval's work: the demo's val split through the evaluation's pipeline and the model (the weights do not
    change the speed), timed whole (pipeline build included), as vit-eval reports img/s."""
    from model import build_model
    from trainer.evaluate import evaluate
    from trainer.step import resolve_amp

    device = torch.device(args.device)
    _, val = index_dataset(ensure_demo_dataset())
    net = build_model(args.model, num_classes=len(val.classes), image_size=args.size).to(device).eval()
    amp = resolve_amp("auto", device)
    rates = []
    for _ in range(args.repeats):
        loader = StageLoader(val, StageSpec.on(device, image_size=args.size, batch_size=args.batch_size), train=False,
                             device=device)
        start = time.perf_counter()
        result = evaluate(net, loader, amp, num_classes=len(val.classes))
        rates.append(result["images"] / (time.perf_counter() - start))
        loader.close()
    print(f"\n$ python tools/bench.py eval --model {args.model} --size {args.size} --batch-size {args.batch_size} "
          f"--device {args.device} --repeats {args.repeats}   ({_device_name(device)})")
    print(f"{'images':>7} {'img/s (runs)':>30} {'median':>8}")
    print(f"{result['images']:>7} {', '.join(f'{r:.1f}' for r in rates):>30} {statistics.median(rates):>8.1f}")


def bench_ddp(args: argparse.Namespace) -> None:
    import subprocess
    import tempfile

    flags = ["--data", "demo", "--budget", f"{args.seconds}s", "--eval-every", "0", "--device", args.device,
             "--step", args.step, "--log-every", f"{min(10.0, args.seconds / 6):g}", "--no-curriculum"]
    if args.model:
        flags += ["--model", args.model]
    if args.size:
        flags += ["--image-size", str(args.size)]
    launchers = {"one process": [sys.executable, "-m", "trainer"],
                 "torchrun, 1 process": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node", "1", "-m", "trainer"]}
    rates: dict[str, list[float]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, launcher in launchers.items():  # alternated, so drift in the machine hits both alike
                out = Path(tmp) / f"{len(rates[name])}-{name.replace(' ', '_').replace(',', '')}"
                subprocess.run([*launcher, *flags, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
                rates[name].append(_steady_rate(out))
                print(f"repeat {i}: {name}: {rates[name][-1]:.1f} img/s", flush=True)
    plain, ddp = (statistics.median(r) for r in rates.values())
    device = torch.device(args.device)
    print(f"\n$ python tools/bench.py ddp --device {args.device} --step {args.step} --seconds {args.seconds} "
          f"--repeats {args.repeats}{f' --model {args.model}' if args.model else ''}"
          f"{f' --size {args.size}' if args.size else ''}   (medians of {args.repeats}, {_device_name(device)})")
    print(f"{'one process img/s':>18} {'torchrun x1 img/s':>18} {'ratio':>6}")
    print(f"{plain:>18.1f} {ddp:>18.1f} {ddp / plain:>6.3f}")


def _imagenet_sized(root: Path, per_class: int) -> Path:
    """Demo-texture JPEGs at ImageNet's usual sizes (sides 375-500 px, ~500x375 on average), built once."""
    from pipelines.demo_dataset import build_demo_dataset

    return build_demo_dataset(root, train_per_class=per_class, val_per_class=1, min_size=375, max_size=500)


def _prepared(src: Path, out: Path, max_size: str, workers: int) -> Path:
    """``src`` through vit-prepare (reused if already there)."""
    from pipelines import prepare

    code = prepare.main([str(src), "--out", str(out), "--max-size", max_size, "--workers", str(workers),
                         "--no-progress"])
    if code:
        raise SystemExit(f"bench: preparing {out} failed with exit code {code}")
    return out


def _mean_bytes(split) -> float:
    return statistics.mean(os.path.getsize(f) for f in split.files)


def bench_small_images(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    full = _imagenet_sized(cache / "full", args.per_class)
    sizes = ",".join([*map(str, args.copy_sizes), "full"])
    train, _ = index_dataset(_prepared(full, cache / f"prepared-{sizes.replace(',', '-')}", sizes, args.workers))
    full_only = dataclasses.replace(train, copies=())
    rows = []
    for size in (32, 64):
        spec = StageSpec(image_size=size, batch_size=args.batch_size, num_threads=args.workers,
                         source_ratio=args.source_ratio)

        read = []

        def rate(split, spec: StageSpec = spec, read: list = read) -> float:
            loader = StageLoader(split, spec, train=True, device=CPU)  # the trainer's rule picks the copy
            ips = time_batches(loader, args.batches, 2, CPU)
            read.append(loader.source_px)
            loader.close()
            return ips

        theirs = _median_of(args.repeats, lambda: rate(full_only))
        ours = _median_of(args.repeats, lambda: rate(train))
        short = read[-1]
        rows.append((size, short, ours, theirs))
        print(f"{size} px: {short}-px copy {ours:.0f} img/s, full-size {theirs:.0f} img/s", flush=True)
    copies = ", ".join(f"{px} px {_mean_bytes(train.for_stage(1, px)) / 1e3:.1f} KB" for px, _ in train.copies)
    print(f"\nfull-size JPEGs: {len(train)} files, {_mean_bytes(train) / 1e3:.0f} KB mean; copies: {copies}")
    print(f"\n$ python tools/bench.py small-images --copy-sizes {','.join(map(str, args.copy_sizes))} "
          f"--source-ratio {args.source_ratio} --workers {args.workers} --batch-size {args.batch_size} "
          f"--batches {args.batches} --repeats {args.repeats}   (medians of {args.repeats})")
    print(f"{'size':>5} {'copy px':>8} {'copy img/s':>11} {'full-size img/s':>16} {'ratio':>6}")
    for size, short, ours, theirs in rows:
        print(f"{size:>5} {short or 'full':>8} {ours:>11.0f} {theirs:>16.0f} {ours / theirs:>6.2f}")


def bench_prepare(args: argparse.Namespace) -> None:
    """vit-prepare on ImageNet-sized JPEGs (folder layout): images/s and bytes written."""
    import tempfile

    src = _imagenet_sized(Path(args.cache) / "full", args.per_class)
    images = sum(1 for _ in src.rglob("*.JPEG"))
    rows = []
    for max_size in args.max_sizes:
        times, written = [], 0
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
                start = time.perf_counter()
                out = _prepared(src, Path(tmp) / "out", max_size, args.workers)
                times.append(time.perf_counter() - start)
                written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rows.append((max_size, images / statistics.median(times), written / 2**20))
        print(f"--max-size {max_size}: {rows[-1][1]:.0f} img/s, {rows[-1][2]:.1f} MiB written", flush=True)
    src_mb = sum(p.stat().st_size for p in src.rglob("*.JPEG")) / 2**20
    print(f"\n$ python tools/bench.py prepare --workers {args.workers} --repeats {args.repeats}   "
          f"({images} ImageNet-sized JPEGs, {src_mb:.1f} MiB; medians of {args.repeats})")
    print(f"{'--max-size':>16} {'img/s':>7} {'img/s/worker':>13} {'MiB written':>12}")
    for max_size, ips, mib in rows:
        print(f"{max_size:>16} {ips:>7.0f} {ips / args.workers:>13.0f} {mib:>12.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description="vitbudget benchmarks")
    sub = p.add_subparsers(dest="bench", required=True)
    c = sub.add_parser("curriculum", help="loader rebuilds: host memory growth and rebuild time")
    c.add_argument("--rebuilds", type=int, default=21, help="three cycles of the seven sizes (at least 8)")
    c.add_argument("--verbose", action="store_true", help="print RSS after every rebuild")
    c.add_argument("--batches", type=int, default=3, help="batches drawn after each rebuild")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=0)
    c.add_argument("--data", default=None)
    c.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    q = sub.add_parser("pipeline", help="DALI vs a torchvision DataLoader, same images and workers")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--batches", type=int, default=15)
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--data", default=None)
    q.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: DALI decodes on the GPU")
    m = sub.add_parser("model", help="locality ViT-S vs DeiT-S training step")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    m.add_argument("--step", default="eager", choices=("eager", "graph", "compile"),
                   help="how TrainStep runs (graph: CUDA only)")
    m.add_argument("--fused-ffn", default="auto", choices=("auto", "on", "off"), help="the locality model's FFN")
    m.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=list(SIZES),
                   help="comma-separated image sizes (default: 32,64,128,224)")
    fu = sub.add_parser("fused", help="the fused locality FFN alone vs PyTorch's ops; loss curves on and off")
    fu.add_argument("--batch-size", type=int, default=256)
    fu.add_argument("--size", type=int, default=224)
    fu.add_argument("--repeats", type=int, default=20)
    fu.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    fu.add_argument("--curve-steps", type=int, default=200, help="0: no loss curves")
    fu.add_argument("--curve-step", default="eager", choices=("eager", "graph", "compile"))
    fu.add_argument("--curve-model", default=None, help="default: the demo's model")
    fu.add_argument("--curve-batch-size", type=int, default=None, help="default: the demo's")
    lp = sub.add_parser("loop", help="the full loop on synthetic on-device data vs the bare step")
    lp.add_argument("--model", default="vit_local_tiny_patch16")
    lp.add_argument("--size", type=int, default=64)
    lp.add_argument("--batch-size", type=int, default=64)
    lp.add_argument("--seconds", type=int, default=30)
    lp.add_argument("--steps", type=int, default=30)
    lp.add_argument("--repeats", type=int, default=3)
    lp.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    lp.add_argument("--step", default="auto", choices=("auto", "eager", "graph", "compile"),
                    help="the trainer's --step, for the loop and the bare step alike")
    tr = sub.add_parser("track", help="the loop with trackers (TensorBoard, MLflow, W&B offline) vs none")
    tr.add_argument("--track", default="tensorboard,mlflow,wandb")
    tr.add_argument("--model", default="vit_local_tiny_patch16")
    tr.add_argument("--size", type=int, default=64)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--seconds", type=int, default=40)
    tr.add_argument("--log-every", type=float, default=1.0, help="metrics lines (and tracker events) per second")
    tr.add_argument("--repeats", type=int, default=3)
    tr.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    tr.add_argument("--step", default="auto", choices=("auto", "eager", "graph", "compile"))
    wd = sub.add_parser("wds", help="the train pipeline from WebDataset shards vs from files (DALI's two readers)")
    wd.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[32, 224])
    wd.add_argument("--batch-size", type=int, default=64)
    wd.add_argument("--batches", type=int, default=15)
    wd.add_argument("--workers", type=int, default=2)
    wd.add_argument("--repeats", type=int, default=3)
    wd.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ev = sub.add_parser("eval", help="vit-eval's throughput: the demo's val split, pipeline and model")
    ev.add_argument("--model", default="vit_local_tiny_patch16")
    ev.add_argument("--size", type=int, default=96)
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--repeats", type=int, default=3)
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    dd = sub.add_parser("ddp", help="the trainer as one process vs torchrun with one process (DDP's overhead)")
    dd.add_argument("--seconds", type=int, default=60, help="budget of each run")
    dd.add_argument("--repeats", type=int, default=2)
    dd.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    dd.add_argument("--step", default="eager", choices=("eager", "compile"),
                    help="the same for both (a captured step does not run under DDP yet)")
    dd.add_argument("--model", default=None, help="default: the demo's")
    dd.add_argument("--size", type=int, default=None, help="default: the demo's")
    si = sub.add_parser("small-images", help="small-image epochs: full-size JPEGs vs a pre-resized copy")
    si.add_argument("--copy-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[64, 128],
                    help="shorter sides of the pre-resized copies")
    si.add_argument("--source-ratio", type=float, default=2.0, help="copy side >= ratio x stage size")
    si.add_argument("--per-class", type=int, default=64, help="train images per class (10 classes)")
    si.add_argument("--cache", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "vitbudget-bench"),
                    help="where the ImageNet-sized set and its copy are built (reused)")
    si.add_argument("--workers", type=int, default=2)
    si.add_argument("--batch-size", type=int, default=64)
    si.add_argument("--batches", type=int, default=8)
    si.add_argument("--repeats", type=int, default=3)
    pr = sub.add_parser("prepare", help="vit-prepare throughput, with and without --max-size")
    pr.add_argument("--max-sizes", nargs="+", default=["full", "256", "64,128,full"])
    pr.add_argument("--per-class", type=int, default=64, help="train images per class (10 classes)")
    pr.add_argument("--cache", default=si.get_default("cache"))
    pr.add_argument("--workers", type=int, default=2)
    pr.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    benches = {"curriculum": bench_curriculum, "pipeline": bench_pipeline, "model": bench_model, "loop": bench_loop,
               "track": bench_track, "eval": bench_eval, "wds": bench_wds, "ddp": bench_ddp,
               "fused": bench_fused, "small-images": bench_small_images, "prepare": bench_prepare}
    benches[args.bench](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
