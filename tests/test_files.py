"""pipelines/files.py: every write lands whole with the usual mode, or not at all, and leaves no temporary behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pipelines.files import FILE_MODE, FOLDER_MODE, atomic_file, atomic_folder, write_bytes_atomic, write_json_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_file_written_through_a_path_lands_whole_with_the_usual_mode(tmp_path):
    target = tmp_path / "weights.bin"
    with atomic_file(target, suffix=".onnx") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".onnx") and not target.exists()
        tmp.write_bytes(b"abc")
    assert target.read_bytes() == b"abc" and _mode(target) == FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == FILE_MODE


def test_a_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert _mode(out) == FOLDER_MODE and (out / "a.txt").read_text() == "first"
    with atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("writer died")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_without_overwrite_a_finished_folder_is_kept(tmp_path):
    out = tmp_path / "demo"
    with atomic_folder(out, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(OSError), atomic_folder(out, overwrite=False) as tmp:  # another writer finished first
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
