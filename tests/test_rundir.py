"""trainer/rundir.py: what RunDir.log writes, read_events reads back, past the line a crash cut short."""

from __future__ import annotations

from trainer.rundir import METRICS, RunDir, read_events
from trainer.track import last_logged_step


def test_read_events_gives_back_what_was_logged_and_skips_a_cut_line(tmp_path):
    assert read_events(tmp_path) == [] and last_logged_step(tmp_path) == -1  # no metrics.jsonl yet
    run = RunDir(tmp_path)
    run.log("start", step=0)
    run.log("train", step=10, loss=1.5)
    run.close()
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"event": "train", "step": 2')  # the crash: half a line, then the resumed attempt appends
    run = RunDir(tmp_path)
    run.log("resume", step=10)
    run.close()
    with open(tmp_path / METRICS, "a") as f:
        f.write("\n[1, 2]\n")  # neither is an event
    events = read_events(tmp_path)
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("train", 10)]  # the resume joined the cut line
    assert events[1]["loss"] == 1.5 and last_logged_step(tmp_path) == 10
