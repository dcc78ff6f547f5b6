"""The paper's Table 1 and Figure 2 from run directories: a markdown table, top-1 against budget time, throughput.

    vit-report RUN_DIR [RUN_DIR ...] [--out DIR] [--by FIELD]     (or python tools/report.py in a checkout)

Writes DIR/table.md (also printed; one row per run, sorted by top-1), DIR/accuracy.png (top-1 against the budget
spent, one line per run, a mark per evaluation, stage changes marked) and DIR/throughput.png (img/s and data wait
against the budget spent, one panel per run, its stages shaded). ``--by preset`` (or any config.json field) groups
runs, e.g. seeds of one recipe, into mean +/- standard deviation rows; the figures keep one line per run, coloured by
group. A run without a final evaluation (still going, diverged, errored) shows its last one, and its state in the
stop column ("running" when it has no summary yet); a resumed run is one line across its
attempts (what an attempt trained after its last checkpoint is dropped, as the resume dropped it). The figures need
matplotlib: pip install -e ".[report]".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.rundir import read_events, write_bytes_atomic

PROG = "vit-report"
ENDINGS = ("diverged", "error", "interrupted", "stopped")  # metrics.jsonl events that end a run early


class ReportError(ValueError):
    """A folder that cannot be reported on; the message is one line naming it."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    status: str  # finished, running, diverged, error, interrupted, stopped
    evals: list[dict[str, Any]] = field(default_factory=list)  # eval events of the surviving timeline
    trains: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    device: str | None = None
    attempts: int = 1
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # fast paths that fell back (fallback events)

    @property
    def name(self) -> str:
        return self.path.name if self.path.name not in ("", ".") else str(self.path)

    def get(self, key: str) -> Any:
        """A field of the run for --by: config.json's, else the summary's."""
        if key in self.config:
            return self.config[key]
        return (self.summary or {}).get(key)

    @property
    def sizes(self) -> str:
        """"train px → eval px": what the run trained at last and was evaluated at (the plan's, before the end)."""
        summary, cfg = self.summary or {}, self.config
        train = summary.get("image_size") or cfg.get("image_size")
        evaluated = summary.get("eval_size") or cfg.get("eval_size") or cfg.get("image_size")
        if train is None:
            return "-"
        return f"{train}" if evaluated in (None, train) else f"{train} → {evaluated}"

    @property
    def top1(self) -> float | None:
        if self.summary and self.summary.get("top1") is not None:
            return self.summary["top1"]
        return self.evals[-1]["top1"] if self.evals else None

    @property
    def top5(self) -> float | None:
        if self.summary and self.summary.get("top5") is not None:
            return self.summary["top5"]
        return self.evals[-1].get("top5") if self.evals else None

    @property
    def images_seen(self) -> int | None:
        if self.summary and "images_seen" in self.summary:
            return self.summary["images_seen"]
        seen = [e["images_seen"] for e in self.trains if "images_seen" in e]
        return seen[-1] if seen else None

    @property
    def epochs(self) -> float | None:
        if self.summary and "epochs" in self.summary:
            return self.summary["epochs"]
        marks = [e["epoch"] for e in self.evals + self.trains if "epoch" in e]
        return max(marks) if marks else None

    @property
    def mean_ips(self) -> float | None:
        """Images per second of training, over the logged intervals (stage entries and evaluations excluded)."""
        spans = [(e["images_per_sec"] * e["interval_s"], e["interval_s"]) for e in self.trains
                 if e.get("images_per_sec") is not None and e.get("interval_s")]
        total = sum(s for _, s in spans)
        return sum(i for i, _ in spans) / total if total else None

    @property
    def elapsed_s(self) -> float:
        if self.summary and "elapsed_s" in self.summary:
            return self.summary["elapsed_s"]
        times = [e["elapsed_s"] for e in self.evals + self.trains + self.stages if "elapsed_s" in e]
        return max(times, default=0.0)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run(path: Path) -> Run:
    """A run directory as far as it got. Raises ReportError for a folder that is not one."""
    config = _read_json(path / "config.json")
    metrics = path / "metrics.jsonl"
    if config is None or not metrics.is_file():
        raise ReportError(f"{path} is not a vit-train run directory (no readable config.json and metrics.jsonl)")
    events = read_events(path)
    summary = _read_json(path / "summary.json")
    run = Run(path=path, config=config, summary=summary, status="running")
    for e in events:
        kind = e.get("event")
        if kind == "resume":  # what the last attempt did after its checkpoint was lost with it
            spent = e.get("spent_before_s", 0.0)
            run.evals = [x for x in run.evals if x.get("elapsed_s", 0.0) <= spent]
            run.trains = [x for x in run.trains if x.get("elapsed_s", 0.0) <= spent]
            run.stages = [x for x in run.stages if x.get("elapsed_s", 0.0) <= spent]
            run.attempts += 1
            run.status = "running"
        elif kind == "start":
            run.device = e.get("device", run.device)
        elif kind == "eval":
            run.evals.append(e)
        elif kind == "train":
            run.trains.append(e)
        elif kind == "stage" and not (run.stages and run.stages[-1].get("stage") == e.get("stage")):
            run.stages.append(e)  # (a resume re-enters the stage it was in: not a change)
        elif kind == "fallback":
            run.fallbacks.append(e)
        elif kind in ENDINGS:
            run.status = kind
    if summary is not None:
        reason = summary.get("stop_reason", "budget")
        run.status = "finished" if reason == "budget" else reason
        run.device = summary.get("device", run.device)
    return run


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _budget(run: Run) -> str:
    seconds = run.config.get("budget_s")
    if seconds is None:
        return "-"
    from trainer.config import format_duration

    return format_duration(seconds)


FAST_PATHS = (("step_mode", "step", {}), ("fused_ffn", "ffn", {True: "fused", False: "ops"}),
              ("decoder", "decoder", {}))


def fast_paths(run: Run) -> str:
    """What ran, stage by stage: the step mode, the FFN (fused kernel or PyTorch's ops) and the decoder, each as
    its values in stage order ("graph→eager" where it changed), then how many fallbacks there were."""
    stages = (run.summary or {}).get("stages")
    if not stages:  # still running, or ended early: the stage entries, with the fallbacks since applied
        stages = [dict(s) for s in run.stages]
        for e in run.fallbacks:
            key = {"step": "step_mode", "ffn": "fused_ffn", "decoder": "decoder"}[e["path"]]
            for s in stages:
                if s.get("stage") == e.get("stage"):
                    s[key] = e["to"]
    parts = []
    for key, _, names in FAST_PATHS:
        seen: list[str] = []
        for s in stages:
            if s.get(key) is not None and names.get(s[key], str(s[key])) not in seen[-1:]:
                seen.append(names.get(s[key], str(s[key])))
        if seen:
            parts.append("→".join(seen))
    text = " · ".join(parts) or "-"
    return f"{text} ({len(run.fallbacks)} fallback{'s' if len(run.fallbacks) != 1 else ''})" if run.fallbacks else text


def sort_runs(runs: list[Run]) -> list[Run]:
    """Best top-1 first; runs without an evaluation last, in the order given."""
    return sorted(runs, key=lambda r: -r.top1 if r.top1 is not None else float("inf"))


def run_table(runs: list[Run]) -> str:
    head = ("| run | model | preset | train → eval px | budget | device | step · FFN · decoder | top-1 | top-5 | "
            "epochs | images seen | mean img/s | stop |")
    rows = [head, "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sort_runs(runs):
        rows.append(f"| {r.name} | {r.config.get('model', '-')} | {r.config.get('preset') or '-'} | "
                    f"{r.sizes} | {_budget(r)} | {r.device or '-'} | {fast_paths(r)} | "
                    f"{_pct(r.top1)} | "
                    f"{_pct(r.top5)} | {_num(r.epochs, '.2f')} | {_num(r.images_seen, ',')} | "
                    f"{_num(r.mean_ips, '.0f')} | {r.status} |")
    return "\n".join(rows) + "\n"


def groups_of(runs: list[Run], by: str) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(str(r.get(by)), []).append(r)
    return out


def _mean_sd(values: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values) * scale, fmt)}"


def group_table(runs: list[Run], by: str) -> str:
    """One row per value of ``by``: mean ± standard deviation over its runs, best mean top-1 first."""
    rows = [f"| {by} | runs | model | top-1 (%) | top-5 (%) | epochs | mean img/s | stop |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    groups = groups_of(runs, by)

    def mean_top1(item: tuple[str, list[Run]]) -> float:
        scored = [r.top1 for r in item[1] if r.top1 is not None]
        return -statistics.fmean(scored) if scored else float("inf")

    for value, members in sorted(groups.items(), key=mean_top1):
        models = ", ".join(sorted({str(r.config.get("model", "-")) for r in members}))
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.status for r in members).items()))
        rows.append(f"| {value} | {len(members)} | {models} | "
                    f"{_mean_sd([r.top1 for r in members if r.top1 is not None], 100)} | "
                    f"{_mean_sd([r.top5 for r in members if r.top5 is not None], 100)} | "
                    f"{_mean_sd([r.epochs for r in members if r.epochs is not None], 1, '.2f')} | "
                    f"{_mean_sd([r.mean_ips for r in members if r.mean_ips is not None], 1, '.0f')} | {statuses} |")
    return "\n".join(rows) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _time_axis(runs: list[Run]) -> tuple[float, str]:
    """Hours, as the paper's Figure 2, unless every run is shorter than an hour (then minutes)."""
    longest = max((r.elapsed_s for r in runs), default=0.0)
    return (3600.0, "hours of budget spent") if longest >= 3600 else (60.0, "minutes of budget spent")


def _colours(runs: list[Run], by: str | None) -> tuple[list[Any], list[str]]:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    if by is None:
        return [cycle[i % len(cycle)] for i in range(len(runs))], [r.name for r in runs]
    keys = list(dict.fromkeys(str(r.get(by)) for r in runs))
    return ([cycle[keys.index(str(r.get(by))) % len(cycle)] for r in runs],
            [f"{by}={r.get(by)}" for r in runs])


def accuracy_figure(runs: list[Run], by: str | None = None):
    """Top-1 against the budget spent: one line per run, a mark per evaluation, stage changes as triangles on it."""
    import numpy as np

    plt = _pyplot()
    unit, label = _time_axis(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours, labels = _colours(runs, by)
    shown: set[str] = set()
    for run, colour, name in zip(runs, colours, labels, strict=True):
        xs = [e["elapsed_s"] / unit for e in run.evals]
        ys = [100 * e["top1"] for e in run.evals]
        ax.plot(xs, ys, marker="o", markersize=3.5, color=colour, label=None if name in shown else name)
        shown.add(name)
        changes = [s["elapsed_s"] / unit for s in run.stages[1:]]  # the first stage is the start, not a change
        if changes and xs:
            ax.scatter(changes, np.interp(changes, xs, ys), marker="^", s=22, color=colour, zorder=3)
    ax.set_xlabel(label)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Top-1 against the budget spent (triangles: image-size stage changes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def throughput_figure(runs: list[Run], by: str | None = None):
    """Per run, one panel: img/s (left axis) and data wait (right axis, dashed) against the budget spent, each
    stage shaded and labelled with its size."""
    plt = _pyplot()
    unit, label = _time_axis(runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 1.9 * len(runs) + 0.6), sharex=True, squeeze=False)
    colours, labels = _colours(runs, by)
    for ax, run, colour, name in zip(axes[:, 0], runs, colours, labels, strict=True):
        xs = [e["elapsed_s"] / unit for e in run.trains]
        ax.plot(xs, [e["images_per_sec"] for e in run.trains], color=colour, label="img/s")
        ax.set_ylabel("img/s")
        ax.set_title(f"{run.name} ({name})" if by else run.name, fontsize=9, loc="left")
        wait = ax.twinx()
        wait.plot(xs, [100 * e.get("data_wait", 0.0) for e in run.trains], color="grey", linestyle="--",
                  label="data wait")
        wait.set_ylabel("data wait (%)", fontsize=8)
        wait.set_ylim(0, 100)
        end = run.elapsed_s / unit
        for i, stage in enumerate(run.stages):
            start = stage["elapsed_s"] / unit
            stop = run.stages[i + 1]["elapsed_s"] / unit if i + 1 < len(run.stages) else end
            ax.axvspan(start, stop, color=colour, alpha=0.06 if i % 2 else 0.14, linewidth=0)
            ax.text(start, 1.0, f" {stage['image_size']}px", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top")
    axes[-1, 0].set_xlabel(label)
    fig.tight_layout()
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=Path("report"), help="where table.md and the figures go")
    p.add_argument("--by", metavar="FIELD", help="group runs by a config.json field (e.g. preset, model, seed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    table = run_table(runs) + ("\n" + group_table(runs, args.by) if args.by else "")
    args.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out / "table.md", table.encode())
    print(table, end="")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f'{PROG}: matplotlib is not installed, so no figures (pip install -e ".[report]")', file=sys.stderr)
        return 0
    import io

    for name, make in (("accuracy.png", accuracy_figure), ("throughput.png", throughput_figure)):
        fig = make(runs, args.by)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        write_bytes_atomic(args.out / name, buffer.getvalue())
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
