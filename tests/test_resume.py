"""Resume and signals on real CPU training runs: SIGKILL then resume, SIGTERM writes a checkpoint."""

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
from trainer.checkpoint import list_checkpoints, load_checkpoint
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_resumed_budget_counts_earlier_attempts_and_keeps_the_schedule_position():
    now = [1000.0]
    first = Budget(100, clock=lambda: now[0])
    now[0] += 40
    spent = first.elapsed
    resumed = Budget(100, clock=lambda: now[0], spent_before=spent)  # a new process: a new clock origin
    assert resumed.elapsed == pytest.approx(40) and resumed.remaining == pytest.approx(60)
    assert lr_factor("cosine-time", resumed.fraction) == pytest.approx(lr_factor("cosine-time", 0.4))
    now[0] += 60
    assert resumed.fraction == 1.0 and not resumed.can_fit(0.1)


def test_sigkill_then_resume_finishes_and_counts_the_spent_budget(tmp_path, colour_dataset):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(colour_dataset, out, "25s"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def two_periodic_checkpoints_and_all_readable() -> bool:
            readable = _all_checkpoints_load(out)  # at every poll, every checkpoint on disk must load
            return sum(e["event"] == "checkpoint" for e in _events(out)) >= 3 and readable >= 1
        _wait_for(two_periodic_checkpoints_and_all_readable, 60, proc)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _all_checkpoints_load(out) >= 1
    killed_at = max(e["elapsed_s"] for e in _events(out))
    last_ckpt = [e for e in _events(out) if e["event"] == "checkpoint"][-1]

    start = time.monotonic()
    done = subprocess.run(_command(colour_dataset, out, "25s"), cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    resume = [e for e in _events(out) if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == last_ckpt["step"]
    assert resume[0]["spent_before_s"] == pytest.approx(last_ckpt["elapsed_s"], abs=0.5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["attempts"] == 2
    assert summary["elapsed_s"] <= 25 + 2
    # the second process trained only for what the first had not spent (plus its start-up)
    assert wall < 25 - resume[0]["spent_before_s"] + 15
    assert killed_at >= resume[0]["spent_before_s"]
    assert (out / "model.safetensors").stat().st_size > 0
    assert _all_checkpoints_load(out) >= 1


def test_sigterm_checkpoints_and_exits_with_a_resume_hint(tmp_path, colour_dataset):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(colour_dataset, out, "60s"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(e["event"] == "train" for e in _events(out)), 60, proc)
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"vit-train --resume {out}" in err and len(err.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "stopped" and summary["signal"] == "SIGTERM"
    newest = list_checkpoints(out / "checkpoints")[-1]
    payload = load_checkpoint(newest)
    last_train = [e for e in _events(out) if e["event"] == "train"][-1]
    assert payload["state"]["step"] >= last_train["step"]
    assert isinstance(payload["model"]["pos_embed"], torch.Tensor)
    assert payload["budget_spent_s"] > 0 and payload["config"]["budget_s"] == 60
