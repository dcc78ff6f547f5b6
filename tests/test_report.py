"""vit-report (trainer/report.py): the table and figures made from run directories with known metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainer import report

pytest.importorskip("matplotlib")


def make_run(root: Path, name: str, events: list[dict], summary: dict | None = None, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"model": "vit_local_tiny_patch16", "preset": None, "image_size": 64, "budget_s": 120.0, "seed": 0,
           **config}
    (run / "config.json").write_text(json.dumps(cfg))
    # a str is written as it is: the line a crash cut short
    (run / "metrics.jsonl").write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in events))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def timeline(top1s: list[float], every: float = 10.0, stage_at: float | None = None, ips: float = 100.0) -> list:
    events = [{"event": "start", "device": "cpu", "attempt": 0},
              {"event": "stage", "stage": 0, "image_size": 32, "elapsed_s": 1.0}]
    for i, top1 in enumerate(top1s, 1):
        t = i * every
        if stage_at is not None and t - every < stage_at <= t:
            events.append({"event": "stage", "stage": 1, "image_size": 64, "elapsed_s": stage_at})
        events.append({"event": "train", "images_per_sec": ips, "interval_s": every, "images_seen": int(ips * t),
                       "data_wait": 0.1, "epoch": i / 2, "elapsed_s": t - 1})
        events.append({"event": "eval", "top1": top1, "top5": min(1.0, top1 + 0.3), "epoch": i / 2, "elapsed_s": t})
    return events


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    finished = make_run(tmp_path, "finished", timeline([0.2, 0.4, 0.6], stage_at=15.0),
                        {"top1": 0.61, "top5": 0.9, "epochs": 1.5, "images_seen": 3000, "elapsed_s": 31.0,
                         "stop_reason": "budget", "device": "cpu"}, preset="paper-ours")
    resumed_events = timeline([0.1, 0.3, 0.45])  # the third evaluation came after the checkpoint at 25 s ...
    resumed_events += [{"event": "resume", "step": 50, "spent_before_s": 25.0},
                       {"event": "start", "device": "cpu", "attempt": 1},
                       {"event": "stage", "stage": 0, "image_size": 32, "elapsed_s": 26.0},
                       {"event": "eval", "top1": 0.5, "top5": 0.8, "epoch": 2.0, "elapsed_s": 40.0}]
    resumed = make_run(tmp_path, "resumed", resumed_events,
                       {"top1": 0.52, "top5": 0.8, "epochs": 2.0, "images_seen": 4000, "elapsed_s": 41.0,
                        "stop_reason": "budget"}, preset="paper-ours", seed=1)
    running = make_run(tmp_path, "running", timeline([0.3, 0.35]) + ['{"event": "train", "elaps'],
                       preset="paper-deit-s")
    diverged = make_run(tmp_path, "diverged", timeline([0.1]) + [{"event": "diverged", "step": 12}],
                        {"stop_reason": "diverged", "epochs": 0.5, "images_seen": 1000, "elapsed_s": 12.0},
                        preset="paper-deit-s")
    return {"finished": finished, "resumed": resumed, "running": running, "diverged": diverged}


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_has_each_runs_numbers_and_state_best_first(runs):
    loaded = [report.load_run(p) for p in runs.values()]
    table = report.run_table(loaded)
    order = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert order == ["finished", "resumed", "running", "diverged"]  # 61%, 52%, then the last evaluations: 35%, 10%
    finished = _row(table, "finished")
    assert finished[7:] == ["61.0%", "90.0%", "1.50", "3,000", "100", "finished"]
    assert finished[1:6] == ["vit_local_tiny_patch16", "paper-ours", "64", "2m", "cpu"]
    assert _row(table, "running")[7] == "35.0%" and _row(table, "running")[-1] == "running"
    assert _row(table, "diverged")[7] == "10.0%" and _row(table, "diverged")[-1] == "diverged"


def test_the_table_says_what_ran_at_each_stage_and_what_fell_back(tmp_path):
    ran = [{"stage": 0, "step_mode": "graph", "fused_ffn": True, "decoder": "mixed"},
           {"stage": 1, "step_mode": "compile", "fused_ffn": False, "decoder": "mixed"}]
    fell = [{"event": "fallback", "path": "step", "failed": "graph", "to": "compile", "stage": 1},
            {"event": "fallback", "path": "ffn", "failed": True, "to": False, "stage": 1}]
    done = make_run(tmp_path, "done", timeline([0.5], stage_at=5.0) + fell,
                    {"top1": 0.5, "stop_reason": "budget", "stages": ran})
    assert _row(report.run_table([report.load_run(done)]), "done")[6] == \
        "graph→compile · fused→ops · mixed (2 fallbacks)"
    # still running: the stage entries as logged, with the fallbacks since applied
    entries = [{"event": "stage", "stage": k, "image_size": 32 * (k + 1), "elapsed_s": float(k), **r}
               for k, r in enumerate(ran)]
    entries[1].update(step_mode="graph", fused_ffn=True)  # what stage 1 began with
    going = make_run(tmp_path, "going", [{"event": "start", "device": "cuda:0"}, *entries, fell[0]])
    assert _row(report.run_table([report.load_run(going)]), "going")[6] == \
        "graph→compile · fused · mixed (1 fallback)"
    # a run from before the fast paths were recorded: nothing to say
    assert _row(report.run_table([report.load_run(make_run(tmp_path, "old", timeline([0.5])))]), "old")[6] == "-"


def test_a_resumed_run_is_one_line_without_what_its_lost_attempt_did(runs):
    run = report.load_run(runs["resumed"])
    assert run.attempts == 2 and run.status == "finished"
    assert [e["elapsed_s"] for e in run.evals] == [10.0, 20.0, 40.0]  # the 30-s evaluation was after the checkpoint
    fig = report.accuracy_figure([run])
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == pytest.approx([10 / 60, 20 / 60, 40 / 60])  # minutes: every run < 1 h
    assert list(line.get_ydata()) == pytest.approx([10.0, 30.0, 50.0])


def test_grouping_gives_mean_and_spread(runs):
    loaded = [report.load_run(p) for p in runs.values()]
    table = report.group_table(loaded, "preset")
    ours = _row(table, "paper-ours")
    assert ours[1] == "2" and ours[3] == "56.5 ± 6.4"  # mean of 61 and 52; sample sd 6.36
    deit = _row(table, "paper-deit-s")
    assert deit[1] == "2" and deit[3] == "22.5 ± 17.7" and deit[-1] == "1 diverged, 1 running"
    assert table.splitlines()[2].startswith("| paper-ours |")  # best mean first


def test_each_figure_has_one_line_per_run_and_marks_stage_changes(runs):
    loaded = [report.load_run(p) for p in runs.values()]
    acc = report.accuracy_figure(loaded, by="preset")
    assert len(acc.axes[0].get_lines()) == len(loaded)
    stage_marks = [c for c in acc.axes[0].collections if len(c.get_offsets())]
    assert len(stage_marks) == 1 and len(stage_marks[0].get_offsets()) == 1  # only "finished" changed stage
    assert stage_marks[0].get_offsets()[0][1] == pytest.approx(30.0)  # on its line, between 20% and 40%
    thr = report.throughput_figure(loaded)
    panels = [ax for ax in thr.axes if ax.get_ylabel() == "img/s"]
    assert len(panels) == len(loaded) and all(len(ax.get_lines()) == 1 for ax in panels)


def test_the_cli_writes_the_table_and_both_figures(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(p) for p in runs.values()] + ["--out", str(out), "--by", "preset"]) == 0
    table = (out / "table.md").read_text()
    assert "| paper-ours | 2 |" in table and "| finished |" in table
    for name in ("accuracy.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "report"
    assert report.main([str(runs["finished"]), str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err
    assert not out.exists()


def test_without_matplotlib_the_table_is_written_and_one_line_says_why_no_figures(runs, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "report"
    assert report.main([str(runs["finished"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '.[report]' in err
    assert (out / "table.md").exists() and not (out / "accuracy.png").exists()
