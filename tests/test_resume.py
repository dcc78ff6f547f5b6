"""Resume and signals on real CPU training runs: a run in its own process is SIGKILLed and resumed (in this
process, on the fake clock of conftest.FakeTime), or SIGTERMed and writes a checkpoint. The killed processes have
budgets far longer than the test waits: what is asserted is what the runs wrote, not how long they took."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.budget import Budget
from trainer.checkpoint import list_checkpoints, load_checkpoint, load_latest
from trainer.cli import main
from trainer.schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]


def _command(data: Path, out: Path, budget: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "--data", str(data), "--out", str(out), "--budget", budget,
            "--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "8", "--workers", "1",
            "--ckpt-every", "1s", "--log-every", "1"]


def _events(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _all_checkpoints_load(out: Path) -> int:
    n = 0
    for path in list_checkpoints(out / "checkpoints"):
        try:
            load_checkpoint(path)
            n += 1
        except FileNotFoundError:  # pruned between listing and reading: fine
            pass
    return n


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    """Poll until ``predicate()``; the process must still be running (its budget is far longer than ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_resumed_budget_counts_earlier_attempts_and_keeps_the_schedule_position():
    """A new process's Budget given the spent seconds: elapsed, remaining and the lr schedule's position carry on
    from them, and at the end of the budget no step can start."""
    now = [1000.0]
    first = Budget(100, clock=lambda: now[0])
    now[0] += 40
    spent = first.elapsed
    resumed = Budget(100, clock=lambda: now[0], spent_before=spent)  # a new process: a new clock origin
    assert resumed.elapsed == pytest.approx(40) and resumed.remaining == pytest.approx(60)
    assert lr_factor("cosine-time", resumed.fraction) == pytest.approx(lr_factor("cosine-time", 0.4))
    now[0] += 60
    assert resumed.fraction == 1.0 and resumed.remaining == pytest.approx(0) and not resumed.can_start(0.1)


def test_sigkill_then_resume_finishes_and_counts_the_spent_budget(tmp_path, colour_dataset, fake_time):
    """SIGKILL after two periodic checkpoints: every checkpoint on disk loads at every poll; the same command
    resumes from the newest one, starting its budget account at what that checkpoint spent, and finishes the
    budget (attempt 2) with the final weights."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(colour_dataset, out, "120s"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def two_periodic_checkpoints_and_all_readable() -> bool:
            readable = _all_checkpoints_load(out)  # at every poll, every checkpoint on disk must load
            return sum(e["event"] == "checkpoint" for e in _events(out)) >= 3 and readable >= 1
        _wait_for(two_periodic_checkpoints_and_all_readable, 100, proc)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _all_checkpoints_load(out) >= 1
    newest = load_latest(out / "checkpoints").payload  # what the resume must start from

    fake_time.step_s = 4.0  # the rest of the 120-s budget in a few dozen steps (a checkpoint after each)
    assert main(_command(colour_dataset, out, "120s")[3:]) == 0  # the same command: it resumes
    resume = [e for e in _events(out) if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == newest["state"]["step"]
    assert resume[0]["spent_before_s"] == pytest.approx(newest["budget_spent_s"], abs=1e-3)
    start = [e for e in _events(out) if e["event"] == "start"]
    assert [e["attempt"] for e in start] == [0, 1]
    assert start[1]["elapsed_s"] == pytest.approx(newest["budget_spent_s"], abs=1e-3)  # its account starts there
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["attempts"] == 2
    assert newest["budget_spent_s"] < summary["train_s"] and summary["elapsed_s"] <= 120
    assert summary["steps"] > newest["state"]["step"]
    assert (out / "model.safetensors").stat().st_size > 0
    assert _all_checkpoints_load(out) >= 1


def test_sigterm_checkpoints_and_exits_with_a_resume_hint(tmp_path, colour_dataset):
    """SIGTERM once training has begun: exit 128+15 with one stderr line giving the resume command, summary.json
    stop_reason stopped, and a checkpoint at or after the last logged step that loads with the spent budget."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(colour_dataset, out, "120s"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(e["event"] == "train" for e in _events(out)), 100, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # a hang fails here; a run that ignored the signal would exit 0
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"vit-train --resume {out}" in err and len(err.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "stopped" and summary["signal"] == "SIGTERM"
    newest = list_checkpoints(out / "checkpoints")[-1]
    payload = load_checkpoint(newest)
    last_train = [e for e in _events(out) if e["event"] == "train"][-1]
    assert payload["state"]["step"] >= last_train["step"]
    assert isinstance(payload["model"]["pos_embed"], torch.Tensor)
    assert 0 < payload["budget_spent_s"] < 120 and payload["config"]["budget_s"] == 120
