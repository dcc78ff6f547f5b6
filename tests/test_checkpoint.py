"""Checkpoint files: atomic, pruned to the last two, loadable with weights_only, a corrupt newest one skipped."""

from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import NoCheckpointError, list_checkpoints, load_latest, save_checkpoint


def _payload(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"lr": 1e-3, "name": "x"}}


def test_keeps_the_last_two_and_leaves_no_temp_files(tmp_path):
    """Three saves leave the last two files and nothing else; the newest loads whole."""
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _payload(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000020.pt", "ckpt-000000030.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000020.pt", "ckpt-000000030.pt"]
    loaded = load_latest(tmp_path)
    assert loaded.payload["step"] == 30 and not loaded.skipped
    assert torch.equal(loaded.payload["model"]["w"], torch.full((3,), 30.0))


def test_truncated_newest_is_reported_and_the_previous_used(tmp_path):
    """A truncated newest file is listed as skipped and the one before it is loaded."""
    save_checkpoint(tmp_path, 1, _payload(1))
    newest = save_checkpoint(tmp_path, 2, _payload(2))
    newest.write_bytes(newest.read_bytes()[:100])
    loaded = load_latest(tmp_path)
    assert loaded.payload["step"] == 1
    assert loaded.skipped[0][0] == newest


def test_nothing_readable_is_an_error(tmp_path):
    """No checkpoint, or only a garbage one: NoCheckpointError, naming the file when there is one."""
    with pytest.raises(NoCheckpointError, match="no readable checkpoint"):
        load_latest(tmp_path)
    (tmp_path / "ckpt-000000005.pt").write_bytes(b"garbage")
    with pytest.raises(NoCheckpointError, match="ckpt-000000005.pt"):
        load_latest(tmp_path)
