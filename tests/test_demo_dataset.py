"""The synthetic demo dataset (pipelines.demo_dataset): its layout and counts, JPEGs of varied sizes, some
grayscale, textured; the same bytes from the same seed; built whole or not at all, reused when complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import demo_dataset
from pipelines.demo_dataset import CLASS_NAMES, build_demo_dataset, default_demo_root, ensure_demo_dataset

TINY = {"train_per_class": 3, "val_per_class": 2, "min_size": 64, "max_size": 120, "grayscale_every": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", **TINY)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_and_counts(tiny: Path) -> None:
    """train/ and val/ hold the 10 sorted classes with 3 and 2 JPEGs each; DEMO_INFO.json records the counts."""
    assert list(CLASS_NAMES) == sorted(CLASS_NAMES) and len(set(CLASS_NAMES)) == 10
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (tiny / split).iterdir()) == list(CLASS_NAMES)
        for name in CLASS_NAMES:
            files = list((tiny / split / name).iterdir())
            assert len(files) == n and all(f.suffix == ".JPEG" for f in files)
    info = json.loads((tiny / "DEMO_INFO.json").read_text())
    assert info["counts"] == {"train": 30, "val": 20} and info["seed"] == 0
    assert {p.name for p in tiny.iterdir()} == {"train", "val", "DEMO_INFO.json"}


def test_images_decode_with_varied_sizes_and_some_grayscale(tiny: Path) -> None:
    """All 50 decode as JPEG, sides within [64, 120], aspect ratios on both sides of 1, some grayscale ones."""
    sizes, modes = [], []
    for path in tiny.rglob("*.JPEG"):
        with Image.open(path) as im:
            assert im.format == "JPEG"
            im.load()
            sizes.append(im.size)
            modes.append(im.mode)
    assert len(sizes) == 50
    arr = np.array(sizes)
    assert arr.min() >= 64 and arr.max() <= 120
    ratios = arr[:, 0] / arr[:, 1]
    assert len(set(sizes)) > 25 and ratios.min() < 0.9 and ratios.max() > 1.1
    assert 0.5 <= ratios.min() and ratios.max() <= 2.0
    assert set(modes) == {"RGB", "L"} and 5 <= modes.count("L") <= 20


def test_images_are_textured_not_flat(tiny: Path) -> None:
    """Every val image's gray levels vary (std > 15)."""
    for path in (tiny / "val").rglob("*.JPEG"):
        with Image.open(path) as im:
            assert np.asarray(im.convert("L"), dtype=np.float32).std() > 15, path


def test_deterministic(tiny: Path, tmp_path: Path) -> None:
    """A second build with the same seed gives the same files byte for byte; another seed different bytes."""
    again = build_demo_dataset(tmp_path / "again", **TINY)
    a, b = _files(tiny), _files(again)
    assert [p.relative_to(tiny) for p in a] == [p.relative_to(again) for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    other = build_demo_dataset(tmp_path / "other", **{**TINY, "seed": 1})
    first = Path("val", CLASS_NAMES[0], f"{CLASS_NAMES[0]}_00000.JPEG")
    assert (other / first).read_bytes() != (tiny / first).read_bytes()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-build raises and leaves no folder or file behind."""
    real_render, calls = demo_dataset._render, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7:
            raise RuntimeError("simulated crash")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(demo_dataset, "_render", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_demo_dataset(tmp_path / "ds", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_complete_dataset_is_reused(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ensure_demo_dataset on a complete folder renders nothing and touches no file."""
    before = {p: p.stat().st_mtime_ns for p in [tiny, *_files(tiny)]}

    def must_not_render(*args, **kwargs):
        raise AssertionError("regenerated an existing dataset")

    monkeypatch.setattr(demo_dataset, "_render", must_not_render)
    assert ensure_demo_dataset(tiny, **TINY) == tiny
    assert {p: p.stat().st_mtime_ns for p in [tiny, *_files(tiny)]} == before


def test_incomplete_nonempty_root_is_refused(tmp_path: Path) -> None:
    """Building into a folder holding something else raises FileExistsError and keeps its contents."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "stray.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        build_demo_dataset(tmp_path / "ds", **TINY)
    assert (tmp_path / "ds" / "stray.txt").exists()


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo's folder: $VITBUDGET_CACHE, else $XDG_CACHE_HOME/vitbudget, else ~/.cache/vitbudget; demo-v1 in it."""
    monkeypatch.setenv("VITBUDGET_CACHE", str(tmp_path / "c"))
    assert default_demo_root() == tmp_path / "c" / "demo-v1"
    monkeypatch.delenv("VITBUDGET_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_demo_root() == tmp_path / "x" / "vitbudget" / "demo-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_demo_root() == tmp_path / "h" / ".cache" / "vitbudget" / "demo-v1"
