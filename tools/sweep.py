"""Train every (dataset, recipe, seed) combination one after the other and print a markdown table of top-1.

    python tools/sweep.py --data demo /path/mnist5k --recipe fixed="--no-curriculum" \\
        --recipe epochs="--curriculum 32:16:1" --recipe time="--curriculum 32:16@60%" \\
        --common "--budget 2m --image-size 64" --seeds 0 1 2 --out sweeps/curriculum

One run at a time (a budgeted run must not share the machine); each run's directory is kept under --out, and a run
already finished there is read, not repeated, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(data: str, flags: list[str], seed: int, out: Path) -> dict:
    summary = out / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "trainer", "--data", data, "--seed", str(seed), "--out", str(out), *flags]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not summary.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True, help="datasets (folders, or demo)")
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=FLAGS",
                   help="a recipe: its name and the vit-train flags it adds (repeatable)")
    p.add_argument("--common", default="", help="flags every run gets")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    recipes = []
    for item in args.recipe:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            p.error(f"--recipe {item!r}: expected NAME=FLAGS")
        recipes.append((name, shlex.split(flags)))
    common = shlex.split(args.common)
    results: dict[tuple[str, str], list[dict]] = {}
    for seed in args.seeds:  # seed-major: a cut-short sweep still has one run of every cell
        for data in args.data:
            for name, flags in recipes:
                out = args.out / Path(data).name / name / f"seed{seed}"
                s = run_one(data, [*common, *flags], seed, out)
                results.setdefault((data, name), []).append(s)
                shown = f"{100 * s['top1']:.1f}%" if "top1" in s else s.get("error", "?")
                print(f"{Path(data).name:>12} {name:>10} seed {seed}: top-1 {shown}", flush=True)
    print(f"\n$ python tools/sweep.py --common {shlex.quote(args.common)} --seeds {' '.join(map(str, args.seeds))}")
    print("| dataset | recipe | top-1 (median) | runs | epochs | last size | summary at (s) |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for (data, name), runs in results.items():
        ok = [r for r in runs if "top1" in r]
        if not ok:
            print(f"| {Path(data).name} | {name} | failed | {runs[0].get('error')} | | | |")
            continue
        top1 = [100 * r["top1"] for r in ok]
        print(f"| {Path(data).name} | {name} | {statistics.median(top1):.1f}% | "
              f"{', '.join(f'{t:.1f}' for t in top1)} | {statistics.median(r['epochs'] for r in ok):.1f} | "
              f"{ok[0]['image_size']} | {max(r['elapsed_s'] for r in ok):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
