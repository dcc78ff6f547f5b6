"""Build the synthetic demo dataset (``vit-train --data demo``) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.demo_dataset import INFO_NAME, build_demo_dataset, default_demo_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help=f"dataset root (default: {default_demo_root()})")
    parser.add_argument("--train-per-class", type=int, default=260)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_demo_root()

    def progress(done: int, total: int) -> None:
        print(f"\r  {done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)

    existed = (out / INFO_NAME).is_file()
    start = time.perf_counter()
    root = build_demo_dataset(
        out,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        progress=progress,
    )
    info = json.loads((root / INFO_NAME).read_text())
    verb = "reused existing" if existed else f"built in {time.perf_counter() - start:.1f}s:"
    counts = ", ".join(f"{split} {n}" for split, n in info["counts"].items())
    print(f"{verb} {root} ({len(info['classes'])} classes; {counts} images; seed {info['seed']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
