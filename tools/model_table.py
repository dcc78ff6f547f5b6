"""Print each model's parameter count and forward GFLOPs at several image sizes, as the markdown table in README.md.

Usage: python tools/model_table.py [--sizes 32,64,128,224]
FLOPs are counted by torch.utils.flop_counter on one image (a multiply-add counts as 2 FLOPs; DeiT's paper quotes
multiply-adds, so its "4.6 G" for DeiT-S at 224 px is 9.2 GFLOPs here).
"""

from __future__ import annotations

import argparse
import sys

import torch

from model import MODELS, build_model
from model.flops import forward_flops

SIZES = (32, 64, 128, 224)
ROLE = {
    "vit_local_small_patch16": "ours (paper)",
    "vit_local_tiny_patch16": "ours, DeiT-Ti size",
    "vit_local_test_patch16": "ours, tests",
    "deit_small_patch16_224": "DeiT-S baseline",
    "localvit_small_patch16": "LocalViT-S baseline",
    "deit_tiny_patch16_224": "DeiT-Ti baseline (CPU-sized)",
    "localvit_tiny_patch16": "LocalViT-S's design at Ti size",
}


def forward_gflops(net: torch.nn.Module, size: int) -> float:
    return forward_flops(net, size) / 1e9


def model_table(sizes: tuple[int, ...] = SIZES, num_classes: int = 1000) -> str:
    header = "| model | role | params (M) | " + " | ".join(f"GFLOPs @{s}" for s in sizes) + " |"
    rows = [header, "| --- | --- | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for name in MODELS:
        net = build_model(name, num_classes=num_classes).eval()
        params = sum(p.numel() for p in net.parameters()) / 1e6
        flops = [forward_gflops(net, s) for s in sizes]
        rows.append(f"| `{name}` | {ROLE[name]} | {params:.2f} | " + " | ".join(f"{f:.2f}" for f in flops) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = p.parse_args()
    print(model_table(tuple(int(s) for s in args.sizes.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
