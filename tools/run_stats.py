"""Summarise a run directory's metrics.jsonl per curriculum stage (a table made from the file, not the console).

Usage: python tools/run_stats.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from trainer.rundir import read_events


def stage_table(run_dir: Path) -> str:
    events = read_events(run_dir)
    stages = {e["stage"]: e for e in events if e["event"] == "stage"}
    rows = [f"{run_dir}", f"{'stage':>5} {'size':>5} {'batch':>5} {'rebuild s':>9} {'median img/s':>12} "
                          f"{'steps':>6} {'last top1':>9}"]
    for index, st in sorted(stages.items()):
        trains = [e for e in events if e["event"] == "train" and e.get("stage") == index]
        evals = [e for e in events if e["event"] == "eval" and e.get("stage") == index]
        # the first interval of a stage holds the rebuild and (with --compile) the recompile: leave it out
        ips = [e["images_per_sec"] for e in trains[1:]] or [e["images_per_sec"] for e in trains]
        median = f"{statistics.median(ips):.0f}" if ips else "-"
        steps = trains[-1]["step"] if trains else "-"
        top1 = f"{100 * evals[-1]['top1']:.1f}%" if evals else "-"
        rows.append(f"{index:>5} {st['image_size']:>5} {st['batch_size']:>5} {st['rebuild_s']:>9.3f} {median:>12} "
                    f"{steps!s:>6} {top1:>9}")
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        if "top1" in s:
            rows.append(f"final: top1 {100 * s['top1']:.2f}% at {s['eval_size']} px, {s['epochs']} epochs, "
                        f"{s['steps']} steps, {s['elapsed_s']:.1f}s of {s['budget_s']:.0f}s")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for arg in argv:
        path = Path(arg)
        if not (path / "metrics.jsonl").is_file():
            print(f"run_stats: error: {path} has no metrics.jsonl", file=sys.stderr)
            return 2
        print(stage_table(path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
