"""Check and time the GPU path in one go: DALI pipeline alone per size, model step alone per size, the full loop.

Usage (on a machine with a CUDA GPU; DALI installed):  python tools/gpu_check.py [--quick] [--out DIR]
Prints a table last; writes gpu_check.json (and the full loop's run directory) under --out.
Runs on the CPU too (``--device cpu``) for a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from model import MODELS, build_model  # noqa: E402
from pipelines import StageLoader, StageSpec, index_dataset  # noqa: E402
from pipelines.demo_dataset import ensure_demo_dataset  # noqa: E402
from trainer.profile import time_batches  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pipeline(split, spec: StageSpec, device: torch.device, batches: int, warmup: int = 3) -> float:
    """Images/s of the train pipeline alone (batches land on the device; nothing consumes them)."""
    loader = StageLoader(split, spec, train=True, device=device)
    ips = time_batches(loader, batches, warmup, device)
    loader.close()
    return ips


def time_model(name: str, size: int, batch: int, device: torch.device, amp: torch.dtype | None, steps: int,
               compile_: bool = False, warmup: int = 3) -> tuple[float, float]:
    """Images/s and peak memory (GiB) of forward+backward+AdamW on synthetic on-device data."""
    if name in MODELS:
        net = build_model(name, num_classes=1000, image_size=size)
    else:  # a timm baseline such as DeiT-S, at the same size
        net = timm.create_model(name, num_classes=1000, img_size=size)
    net = net.to(device, memory_format=torch.channels_last)
    step_net = torch.compile(net) if compile_ else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, size, size, 3, device=device, dtype=dtype).permute(0, 3, 1, 2)  # NHWC, as DALI gives
    y = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(step_net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    ips = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ips, peak


def check_gpu_matches_cpu_decode(val_split, size: int) -> float:
    """Mean |GPU - CPU| of the val pipeline's first batch (normalized units): nvJPEG vs libjpeg rounding only."""
    gpu = StageSpec(image_size=size, batch_size=32, device="gpu", device_id=0, half=False)
    cpu = replace(gpu, device="cpu", device_id=None)
    g = next(iter(StageLoader(val_split, gpu, train=False, device=torch.device("cuda"))))
    c = next(iter(StageLoader(val_split, cpu, train=False, device=torch.device("cpu"))))
    assert torch.equal(g[1].cpu(), c[1]), "labels differ between GPU and CPU pipelines"
    return (g[0].float().cpu() - c[0]).abs().mean().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--data", default=None, help="ImageNet-layout folder (default: the demo dataset, built if missing)")
    p.add_argument("--out", default="gpu-check")
    p.add_argument("--model", default="vit_local_small_patch16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sizes", default="32,64,96,128,160,192,224")
    p.add_argument("--loop-budget", default="90s")
    p.add_argument("--quick", action="store_true", help="few steps (a smoke test)")
    args = p.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = 3 if args.quick else 30
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    data = Path(args.data) if args.data else ensure_demo_dataset()
    train, val = index_dataset(data)
    gpu = device.type == "cuda"
    report: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                    "cpu_cores": os.cpu_count(), "batch_size": args.batch_size, "model": args.model,
                    "data": str(data), "train_images": len(train), "sizes": {}}
    import nvidia.dali
    report["dali"] = nvidia.dali.__version__
    print(json.dumps({k: v for k, v in report.items() if k != "sizes"}), flush=True)
    if gpu:
        report["gpu_vs_cpu_decode_mean_abs"] = check_gpu_matches_cpu_decode(val, 224)
        print(f"val pipeline, GPU vs CPU decode, mean |diff| = {report['gpu_vs_cpu_decode_mean_abs']:.4f}", flush=True)

    for size in sizes:
        spec = StageSpec.on(device, image_size=size, batch_size=args.batch_size)
        row = {"pipeline_ips": time_pipeline(train, spec, device, steps),
               "pipeline_ra_ips": time_pipeline(train, replace(spec, rand_augment=(2, 27)), device, steps)}
        row["model_ips"], row["model_peak_gib"] = time_model(args.model, size, args.batch_size, device, amp, steps)
        row["deit_s_ips"], _ = time_model("deit_small_patch16_224", size, args.batch_size, device, amp, steps)
        report["sizes"][size] = row
        print(size, json.dumps(row), flush=True)

    run_dir = out / "loop"
    cmd = [sys.executable, "-m", "trainer", "--data", str(data), "--model", args.model,
           "--image-size", str(sizes[-1]), "--no-curriculum",  # the loop at one size: comparable with the rows
           "--batch-size", str(args.batch_size), "--budget", args.loop_budget,
           "--device", args.device, "--out", str(run_dir), "--log-every", "5"]
    print("full loop:", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], text=True, capture_output=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    loop: dict = {"exit_code": proc.returncode, "wall_s": time.monotonic() - t0}
    if proc.returncode == 0:
        summary = json.loads((run_dir / "summary.json").read_text())
        trains = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ips = [m["images_per_sec"] for m in trains if m["event"] == "train"][1:]  # skip the warm-up interval
        loop.update(summary=summary, images_per_sec_median=sorted(ips)[len(ips) // 2] if ips else float("nan"))
    report["loop"] = loop
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    print(f"\n{report['device']}  DALI {report['dali']}  torch {report['torch']}  batch {args.batch_size}  "
          f"model {args.model}  amp {amp}")
    print(f"{'size':>5} {'pipeline img/s':>15} {'+RandAug img/s':>15} {'model img/s':>12} {'DeiT-S img/s':>13} "
          f"{'peak GiB':>9} {'bound':>9}")
    for size, r in report["sizes"].items():
        bound = "data" if min(r["pipeline_ips"], r["pipeline_ra_ips"]) < r["model_ips"] else "compute"
        print(f"{size:>5} {r['pipeline_ips']:>15.0f} {r['pipeline_ra_ips']:>15.0f} {r['model_ips']:>12.0f} "
              f"{r['deit_s_ips']:>13.0f} {r['model_peak_gib']:>9.2f} {bound:>9}")
    if "summary" in loop:
        s = loop["summary"]
        print(f"full loop at {sizes[-1]} px: {loop['images_per_sec_median']:.0f} img/s (median of intervals), "
              f"{s['epochs']} epochs, {s['steps']} steps, val top1 {100 * s['top1']:.1f}%, "
              f"elapsed {s['elapsed_s']:.1f}s of budget {s['budget_s']:.0f}s")
    else:
        print(f"full loop FAILED with exit code {loop['exit_code']}")
    return 0 if loop["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
