"""vit-prepare (pipelines/prepare.py) on a miniature ImageNet in each of the three layouts it reads."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.prepare as prep
from pipelines import DatasetError, StageLoader, StageSpec, index_dataset
from tests.mini_imagenet import (
    MiniImageNet,
    make_mini_imagenet,
    write_folder,
    write_ilsvrc,
    write_kaggle,
    write_unsafe_tar,
)
from trainer.cli import main as vit_train

WRITERS = {"ilsvrc": write_ilsvrc, "kaggle": write_kaggle, "folder": write_folder}


@pytest.fixture(scope="module")
def spec() -> MiniImageNet:
    return make_mini_imagenet()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, spec) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {layout: write(root / layout, spec) for layout, write in WRITERS.items()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sources) -> dict[str, Path]:
    """Each layout prepared once (two copies: full size and a 48-px copy); workers 2 for one of them."""
    root = tmp_path_factory.mktemp("prepared")
    outs = {}
    for layout, src in sources.items():
        outs[layout] = root / layout
        workers = "2" if layout == "ilsvrc" else "1"
        assert prep.main([str(src), "--out", str(outs[layout]), "--max-size", "48,full", "--workers", workers,
                          "--no-progress"]) == 0
    return outs


def _listing(out: Path, split: str) -> dict[str, int]:
    """basename -> label from a prepared split's file list."""
    lines = (out / f"{split}.txt").read_text().splitlines()
    return {Path(rel).name: int(label) for rel, label in (line.rsplit(maxsplit=1) for line in lines)}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_every_image_lands_in_its_class_with_sorted_wnid_indices(prepared, spec, layout):
    out = prepared[layout]
    classes = [line.split("\t") for line in (out / "classes.txt").read_text().splitlines()]
    assert [c[1] for c in classes] == sorted(spec.wnids) and [int(c[0]) for c in classes] == [0, 1, 2]
    if layout != "folder":  # the devkit's and Kaggle's human-readable names
        assert [c[2] for c in classes] == [spec.names[w] for w in sorted(spec.wnids)]
    index = {w: i for i, w in enumerate(sorted(spec.wnids))}
    for split, truth in (("train", spec.train), ("val", spec.val)):
        listing = _listing(out, split)
        assert set(listing) == set(truth) - spec.excluded
        for name, label in listing.items():
            assert label == index[truth[name]], (split, name)
            path = out / split / truth[name] / name
            with Image.open(path) as im:
                assert im.format == "JPEG"
                if name in spec.grayscale:
                    assert im.mode == "L"  # kept as it is: the pipeline decodes to RGB
                    continue
                assert im.mode == "RGB"
                pixels = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0)
            assert int(pixels.argmax()) == int(np.argmax(spec.colours[truth[name]])), (split, name)


@pytest.mark.parametrize("layout", list(WRITERS))
def test_manifest_lists_repairs_exclusions_and_counts(prepared, spec, layout):
    manifest = json.loads((prepared[layout] / "manifest.json").read_text())
    repaired = {Path(r["file"]).name: r["reason"] for r in manifest["repaired"]}
    assert set(repaired) == set(spec.repaired)
    for name, kind in spec.repaired.items():
        assert ("CMYK" if kind == "cmyk" else "PNG") in repaired[name]
    excluded = {Path(r["file"]).name: r["reason"] for r in manifest["excluded"]}
    assert set(excluded) == spec.excluded
    assert all("truncated" in reason for reason in excluded.values())
    assert manifest["counts"] == {"train": len(spec.train) - len(spec.excluded), "val": len(spec.val)}
    assert sum(manifest["per_class"]["train"].values()) == manifest["counts"]["train"]
    assert manifest["options"]["layout"] == layout
    assert manifest["copies"] == [{"max_size": None, "path": "."}, {"max_size": 48, "path": "max-48"}]
    assert not (prepared[layout] / prep.WORK).exists()


def test_copies_hold_the_same_files_smaller(prepared, spec):
    out = prepared["ilsvrc"]
    assert (out / "train.txt").read_text() == (out / "max-48" / "train.txt").read_text()
    for rel in (out / "max-48" / "train.txt").read_text().split()[::2]:
        with Image.open(out / "max-48" / rel) as small, Image.open(out / rel) as full:
            assert min(small.size) == min(48, min(full.size))
            assert small.format == "JPEG"


def test_dali_reads_every_listed_file_and_the_stage_picks_its_copy(prepared):
    train, val = index_dataset(prepared["kaggle"])
    assert [px for px, _ in train.copies] == [48]
    for split in (train, val):
        for size, copy_px in ((16, 48), (32, None)):  # 48 >= 2 x 16 but not 2 x 32
            loader = StageLoader(split, StageSpec(image_size=size, batch_size=4, num_threads=1), train=False,
                                 device=torch.device("cpu"))
            labels = torch.cat([y for _, y in loader])
            loader.close()
            assert loader.source_px == copy_px
            assert sorted(labels.tolist()) == sorted(split.labels)  # every file decoded, once


def test_prepared_set_trains_through_the_trainer(prepared, tmp_path, fake_time):
    """A prepared set trains: its 16-px stage reads the 48-px copy, the 32-px stage the full images (on the fake
    clock: the stage is entered after one epoch whatever the machine's load)."""
    out = tmp_path / "run"
    assert vit_train(["--data", str(prepared["ilsvrc"]), "--model", "vit_local_test_patch16", "--image-size", "32",
                      "--curriculum", "16:16:1", "--batch-size", "4", "--workers", "1", "--lr", "0.1",
                      "--budget", "30s", "--out", str(out)]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [e for e in events if e["event"] == "stage"]
    assert stages[0]["image_size"] == 16 and stages[0]["source_px"] == 48  # the small stage read the copy
    assert any(e["image_size"] == 32 and e["source_px"] is None for e in stages)
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "budget"


def test_rerun_after_an_interruption_finishes_the_job(tmp_path, sources, monkeypatch, capsys):
    src = sources["folder"]
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    assert prep.main([str(src), "--out", str(clean), "--workers", "1", "--no-progress"]) == 0

    real, calls = prep.process_class, []

    def dies_on_the_fourth_class(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "process_class", dies_on_the_fourth_class)
    assert prep.main([str(src), "--out", str(broken), "--workers", "1", "--no-progress"]) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert not (broken / "manifest.json").exists() and not (broken / "train.txt").exists()
    assert (broken / prep.WORK / "done").is_dir()
    with pytest.raises(DatasetError, match="unfinished vit-prepare output"):
        index_dataset(broken)  # the trainer refuses half a dataset
    calls.clear()
    assert prep.main([str(src), "--out", str(broken), "--workers", "1", "--no-progress"]) == 0
    assert len(calls) == 3  # the three classes not finished before (6 units: 3 classes x 2 splits)
    manifest = json.loads((broken / "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert _digest(broken) .keys() == _digest(clean).keys()
    differs = [k for k, v in _digest(broken).items() if _digest(clean)[k] != v and k != "manifest.json"]
    assert differs == []
    # a finished job reruns as a no-op; other options are refused
    assert prep.main([str(src), "--out", str(broken), "--workers", "1", "--no-progress"]) == 0
    assert "already prepared" in capsys.readouterr().err
    assert prep.main([str(src), "--out", str(broken), "--quality", "80", "--no-progress"]) == 2
    assert "other options (quality)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["outer", "inner"])
@pytest.mark.parametrize("kind", ["dotdot", "symlink", "absolute"])
def test_unsafe_archive_is_refused_and_nothing_is_written(tmp_path, spec, capsys, where, kind):
    src = write_ilsvrc(tmp_path / "src", spec, unsafe=(where, kind))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    absolute = Path("/tmp/abs.JPEG")
    existed = absolute.exists()
    out = tmp_path / "out"
    assert prep.main([str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "whole archive is refused" in err and err.count("\n") == 1
    assert {"dotdot": "'../escaped.JPEG'", "symlink": "'link.JPEG'", "absolute": "'/tmp/abs.JPEG'"}[kind] in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # --out not even created
    assert absolute.exists() == existed


def test_unsafe_val_archive_is_refused(tmp_path, spec, capsys):
    src = write_ilsvrc(tmp_path / "src", spec)
    write_unsafe_tar(src / prep.VAL_TAR, "dotdot")
    assert prep.main([str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"{prep.VAL_TAR}: member '../escaped.JPEG'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["{missing}"], "is not a folder"),
    (["{empty}"], "no ImageNet layout found"),
    (["{src}", "--max-size", "big"], "--max-size"),
    (["{src}", "--max-size", "64,64"], "lists a size twice"),
    (["{src}", "--subset-classes", "9"], "only 3 classes"),
    (["{src}", "--per-class", "0"], "--per-class must be at least 1"),
    (["{src}", "--layout", "kaggle"], "the kaggle layout"),
    (["{src}", "--out", "{foreign}"], "is not a vit-prepare output"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, sources, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "src": sources["folder"],
             "foreign": tmp_path / "foreign"}
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert prep.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_subsets_are_deterministic(tmp_path, sources):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert prep.main([str(sources["kaggle"]), "--out", str(out), "--subset-classes", "2", "--per-class", "2",
                          "--workers", "1", "--no-progress"]) == 0
    assert (outs[0] / "train.txt").read_text() == (outs[1] / "train.txt").read_text()
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["classes"] == 2 and set(manifest["per_class"]["train"].values()) == {2}
    assert len((outs[0] / "classes.txt").read_text().splitlines()) == 2
    assert any("2 of the source's classes" in d for d in manifest["departures"])


def test_link_hard_links_unchanged_files_only(tmp_path, sources, spec):
    out = tmp_path / "out"
    assert prep.main([str(sources["folder"]), "--out", str(out), "--link", "--workers", "1", "--no-progress"]) == 0
    for name, wnid in spec.train.items():
        if name in spec.excluded:
            continue
        made, source = out / "train" / wnid / name, sources["folder"] / "train" / wnid / name
        assert made.samefile(source) == (name not in spec.repaired), name
    assert json.loads((out / "manifest.json").read_text())["linked"] > 0


def test_one_max_size_resizes_the_dataset_itself_and_says_so(tmp_path, sources, spec):
    out = tmp_path / "out"
    assert prep.main([str(sources["folder"]), "--out", str(out), "--max-size", "40", "--quality", "85",
                      "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["copies"] == [{"max_size": 40, "path": "."}]
    assert any("pre-resized" in d and "40 px" in d for d in manifest["departures"])
    shorter = []
    for split in ("train", "val"):
        for rel in (out / f"{split}.txt").read_text().split()[::2]:
            with Image.open(out / rel) as im:
                shorter.append(min(im.size))
    larger = 0
    for name, data in spec.data.items():
        if name not in spec.excluded:
            with Image.open(io.BytesIO(data)) as im:
                larger += min(im.size) > 40
    assert max(shorter) == 40 and manifest["resized"] == larger > 0
    train, _ = index_dataset(out)
    assert train.copies == ()  # a single copy is the dataset itself


def test_baseline_and_progressive_jpegs_are_kept_as_they_are():
    pixels = np.random.default_rng(0).integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    for progressive, marker in ((False, 0xC0), (True, 0xC2)):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=progressive)
        data = buf.getvalue()
        assert prep._jpeg_coding(data) == (marker, 8)
        image, repair, exclude = prep.inspect_image(data)
        assert image.size == (32, 24) and repair is None and exclude is None
    assert prep._jpeg_coding(b"\xff\xd8\xff\xd9") is None  # no frame header: re-encoded, not trusted
    assert prep.inspect_image(b"")[2] == "empty file"


def test_output_names_never_collide_within_a_class():
    used: set[str] = set()
    names = []
    for name, reencoded in (("x.png", True), ("x.JPEG", False), ("x.jpeg", False), ("noext", True), ("x.JPEG", False)):
        names.append(prep._output_name(name, reencoded, used))
        used.add(names[-1])
    assert names == ["x.JPEG", "x_1.JPEG", "x.jpeg", "noext.JPEG", "x_2.JPEG"]


def test_prepare_reads_every_extension_the_folder_reader_reads(tmp_path):
    """One table (pipelines/files.py): a class folder with an image in each format training reads is read whole by
    the folder reader and by prepare; prepare also takes a GIF (re-encoded as JPEG), the one format it converts,
    which the folder reader counts as skipped."""
    from pipelines.files import CONVERTED_FORMATS, IMAGE_EXTENSIONS, PREPARE_EXTENSIONS

    converted = {ext for exts in CONVERTED_FORMATS.values() for ext in exts}
    assert set(PREPARE_EXTENSIONS) == set(IMAGE_EXTENSIONS) | converted
    src, pillow = tmp_path / "src", Image.registered_extensions()
    for split in ("train", "val"):
        folder = src / split / "n01440764"
        folder.mkdir(parents=True)
        for n, ext in enumerate(PREPARE_EXTENSIONS):
            mode = {".pbm": "1", ".pgm": "L"}.get(ext, "RGB")
            Image.new("RGB", (40, 32), (200, 30, 30)).convert(mode).save(folder / f"im{n:02d}{ext}", pillow[ext])
        (folder / "notes.txt").write_text("x")
    train, _ = index_dataset(src)
    assert sorted(Path(f).suffix for f in train.files) == sorted(IMAGE_EXTENSIONS)
    assert dict(train.skipped) == {**dict.fromkeys(converted, 1), ".txt": 1}

    out = tmp_path / "out"
    assert prep.main([str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["excluded"] == []
    kept = {Path(rel).stem for rel in (out / "train.txt").read_text().split()[::2]}
    assert kept == {f"im{n:02d}" for n in range(len(PREPARE_EXTENSIONS))}
    prepared, _ = index_dataset(out)
    assert len(prepared) == len(PREPARE_EXTENSIONS)  # and training reads every file prepare wrote
