"""Benchmarks behind BENCHMARKS.md; each prints a compact table and the command that produced it.

    python tools/bench.py curriculum [--rebuilds 20] [--data DIR] [--device cpu|cuda]
        Rebuilds the train loader (cycling through the curriculum sizes 32..224) and reports host RSS growth
        after the first cycle and the mean rebuild time: a stage change must not leak pipelines or pool memory.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines import StageLoader, StageSpec, index_dataset  # noqa: E402
from pipelines.demo_dataset import ensure_demo_dataset  # noqa: E402


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
    spec = StageSpec(image_size=sizes[0], batch_size=args.batch_size, device="gpu" if gpu else "cpu",
                     device_id=0 if gpu else None, num_threads=args.workers, half=gpu)
    loader = StageLoader(train, spec, train=True, device=device)
    next(iter(loader))  # first build: libraries and pools warm up, excluded from the growth figure
    gc.collect()
    rss0 = rss_mb()
    dev0 = _device_used_mb() if gpu else 0.0
    times, rss = [], []
    for i in range(args.rebuilds):
        size = sizes[(i + 1) % len(sizes)]
        start = time.perf_counter()
        loader.set_stage(StageSpec(**{**spec.__dict__, "image_size": size}))
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
    args = p.parse_args()
    {"curriculum": bench_curriculum}[args.bench](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
