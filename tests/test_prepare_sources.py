"""vit-prepare (pipelines/prepare.py) on the Hub's Parquet shards (hf-parquet) and on WebDataset tars (wds).

Both sources are built from the same miniature ImageNet as the folder layout (tests/mini_imagenet.py: a CMYK JPEG,
a PNG under a JPEG name, a grayscale and a truncated JPEG among them), so each preparation must equal the folder
path's: the same classes in the same order, the same files (byte for byte), repairs and exclusions.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.prepare as prep
from pipelines import index_dataset
from tests.mini_imagenet import MiniImageNet, make_mini_imagenet, write_folder

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SIZES = ["--max-size", "48,full"]
LISTS = ("manifest.json", "classes.txt", "train.txt", "val.txt")


def _hub_metadata(names: list[str]) -> dict[bytes, bytes]:
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_parquet(path: Path, rows: list[tuple[str | None, bytes, int]], names: list[str] | None,
                  row_group_size: int = 3) -> Path:
    """A shard in the Hub's schema: image {bytes, path}, label int64 (+ the ClassLabel names as metadata)."""
    table = pa.table({"image": pa.array([{"bytes": data, "path": name} for name, data, _ in rows], IMAGE),
                      "label": pa.array([label for *_, label in rows], pa.int64())})
    if names is not None:
        table = table.replace_schema_metadata(_hub_metadata(names))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def _samples(spec: MiniImageNet, split: str, seed: int) -> list[tuple[str, bytes, int]]:
    """(file name, bytes, label index) of a split, shuffled as the Hub's and timm's shards are."""
    index = {w: i for i, w in enumerate(spec.wnids)}
    truth = spec.train if split == "train" else spec.val
    rows = [(name, spec.data[name], index[wnid]) for name, wnid in sorted(truth.items())]
    random.Random(seed).shuffle(rows)
    return rows


def write_hf_parquet(root: Path, spec: MiniImageNet) -> Path:
    """data/train-0000{0,1}-of-00002.parquet, data/validation-00000-of-00001.parquet and an unlabelled test shard."""
    names = [spec.names[w] for w in spec.wnids]
    train = _samples(spec, "train", 1)
    half = len(train) // 2
    write_parquet(root / "data" / "train-00000-of-00002.parquet", train[:half], names)
    write_parquet(root / "data" / "train-00001-of-00002.parquet", train[half:], names)
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", _samples(spec, "val", 2), names)
    test = [(f"ILSVRC2012_test_{i:08d}.JPEG", data, -1) for i, (_, data, _) in enumerate(train[:2], 1)]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", test, names)  # labels -1: must be ignored
    return root


def _wds_members(rows: list[tuple[str, bytes, int]], names: list[str]) -> list[tuple[str, bytes]]:
    members = []
    for n, (name, data, label) in enumerate(rows):
        key = name.rsplit(".", 1)[0]
        members += [(f"{key}.jpg", data), (f"{key}.cls", f"{label}\n".encode())]
        if n % 2 == 0:  # the .json is optional; half the samples carry the class name
            meta = {"filename": name, "label": label, "class_name": names[label]}
            members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def write_wds(root: Path, spec: MiniImageNet) -> Path:
    """imagenet1k-train-000{0,1}.tar and imagenet1k-validation-0000.tar, as timm/imagenet-1k-wds."""
    names = [spec.names[w] for w in spec.wnids]
    train = _samples(spec, "train", 3)
    half = len(train) // 2
    write_tar(root / "imagenet1k-train-0000.tar", _wds_members(train[:half], names))
    write_tar(root / "imagenet1k-train-0001.tar", _wds_members(train[half:], names))
    write_tar(root / "imagenet1k-validation-0000.tar", _wds_members(_samples(spec, "val", 4), names))
    return root


@pytest.fixture(scope="module")
def spec() -> MiniImageNet:
    return make_mini_imagenet()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, spec) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {"folder": write_folder(root / "folder", spec), "hf-parquet": write_hf_parquet(root / "hf", spec),
            "wds": write_wds(root / "wds", spec)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sources) -> dict[str, Path]:
    """Each source prepared once with --layout auto: the folder one as the reference; two workers for hf-parquet."""
    root = tmp_path_factory.mktemp("prepared")
    outs = {}
    for layout, src in sources.items():
        outs[layout] = root / layout
        workers = "2" if layout == "hf-parquet" else "1"
        assert prep.main([str(src), "--out", str(outs[layout]), *SIZES, "--workers", workers, "--no-progress"]) == 0
    return outs


def _classes(out: Path) -> list[list[str]]:
    return [line.split("\t") for line in (out / "classes.txt").read_text().splitlines()]


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _files(out: Path) -> dict[tuple[str, str, int, str], str]:
    """(copy, split, class index, file stem) -> sha256 of every image written, in every copy."""
    index = {c[1]: int(c[0]) for c in _classes(out)}
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name not in LISTS:
            rel = path.relative_to(out).parts
            copy, (split, folder, name) = ("/".join(rel[:-3]) or "."), rel[-3:]
            found[copy, split, index[folder], _stem(name)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _by_index(out: Path, manifest: dict, key: str) -> set[tuple[str, int, str, str]]:
    """The manifest's repaired or excluded files as (split, class index, stem, reason)."""
    index = {c[1]: int(c[0]) for c in _classes(out)}
    entries = set()
    for entry in manifest[key]:
        split, folder, name = entry["file"].split("/")
        entries.add((split, index[folder], _stem(name), entry["reason"]))
    return entries


@pytest.mark.parametrize("layout", ["hf-parquet", "wds"])
def test_same_classes_files_repairs_and_exclusions_as_the_folder_path(prepared, spec, layout):
    ref, out = prepared["folder"], prepared[layout]
    manifest, reference = (json.loads((o / "manifest.json").read_text()) for o in (out, ref))
    assert manifest["options"]["layout"] == layout
    # class order: index i is the i-th WNID in sorted order, in a folder c000i, with the human-readable name
    assert [c[1] for c in _classes(ref)] == spec.wnids
    assert _classes(out) == [[str(i), f"c{i:04d}", spec.names[w]] for i, w in enumerate(spec.wnids)]
    assert "label index" in manifest["class_order"] and "sorted-WNID" in manifest["class_order"]
    assert reference["class_order"] == "sorted class folder names"
    # per-class counts, totals and copies as in the reference
    for split in prep.SPLITS:
        assert [manifest["per_class"][split][f"c{i:04d}"] for i in range(3)] == \
               [reference["per_class"][split][w] for w in spec.wnids]
    for key in ("classes", "counts", "resized", "copies"):
        assert manifest[key] == reference[key], key
    # the same repairs (the CMYK JPEGs, the PNG under a JPEG name) and exclusions (the truncated JPEG)
    assert _by_index(out, manifest, "repaired") == _by_index(ref, reference, "repaired")
    assert _by_index(out, manifest, "excluded") == _by_index(ref, reference, "excluded")
    assert {stem for _, _, stem, _ in _by_index(out, manifest, "excluded")} == {_stem(n) for n in spec.excluded}
    assert {stem for _, _, stem, _ in _by_index(out, manifest, "repaired")} == {_stem(n) for n in spec.repaired}
    # every image written is the reference's, byte for byte, in the same class and copy (full size and max-48)
    files = _files(out)
    assert files == _files(ref) and len(files) == 2 * sum(reference["counts"].values())
    assert not (out / prep.WORK).exists()


@pytest.mark.parametrize("layout", ["hf-parquet", "wds"])
def test_the_file_lists_label_every_image_as_the_folder_path_does(prepared, layout):
    def labels(out: Path) -> dict[tuple[str, str], int]:
        train, val = index_dataset(out)
        return {(s, _stem(Path(f).name)): y for s, split in (("train", train), ("val", val))
                for f, y in zip(split.files, split.labels, strict=True)}

    assert labels(prepared[layout]) == labels(prepared["folder"])


def _counting_parquet_file(reads: list[tuple[str, int]]) -> type:
    """pyarrow's ParquetFile, noting in ``reads`` each (file, row group) whose image bytes are read."""

    class Counted(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            self.source = Path(source).name

        def read_row_group(self, i, columns=None, **kwargs):
            if columns and any(c.startswith("image.bytes") for c in columns):
                reads.append((self.source, i))
            return super().read_row_group(i, columns=columns, **kwargs)

    return Counted


def test_parquet_row_groups_are_each_read_once_and_files_in_src_work_too(tmp_path, sources, prepared, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    for shard in (sources["hf-parquet"] / "data").glob("*.parquet"):  # the shards directly in SRC, no data/
        shutil.copy(shard, flat / shard.name)
    reads: list[tuple[str, int]] = []
    monkeypatch.setattr(pq, "ParquetFile", _counting_parquet_file(reads))
    out = tmp_path / "out"
    assert prep.main([str(flat), "--out", str(out), *SIZES, "--workers", "1", "--link", "--no-progress"]) == 0
    groups = sum(pq.ParquetFile(p).num_row_groups for p in flat.glob("*.parquet") if not p.name.startswith("test"))
    assert len(reads) == len(set(reads)) == groups  # every row group's images read once, none twice
    assert _files(out) == _files(prepared["hf-parquet"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["linked"] == 0  # --link never links a Parquet shard as an image


def test_an_interrupted_parquet_job_resumes_by_shard(tmp_path, sources, prepared, monkeypatch, capsys):
    src, out = sources["hf-parquet"], tmp_path / "out"
    real, calls, armed = prep.process_shard, [], [True]

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(Path(args[1]).name)
        if len(calls) == 2 and armed and armed.pop():
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "process_shard", dies_on_the_second_shard)
    argv = [str(src), "--out", str(out), *SIZES, "--workers", "1", "--no-progress"]
    assert prep.main(argv) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    calls.clear()
    assert prep.main(argv) == 0
    assert calls == ["train-00001-of-00002.parquet", "validation-00000-of-00001.parquet"]  # the first one is kept
    assert _files(out) == _files(prepared["hf-parquet"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["counts"] == json.loads((prepared["hf-parquet"] / "manifest.json").read_text())["counts"]


def test_sources_without_names_or_paths_get_index_folders_and_unique_names(tmp_path, spec):
    """No ClassLabel metadata, no image paths (names from the shard and row) and one null image (left out)."""
    rows = [(None, data, label) for _, data, label in _samples(spec, "train", 5)]
    rows[3] = (None, None, rows[3][2])
    write_parquet(tmp_path / "src" / "train-00000-of-00001.parquet", rows[:6], None, row_group_size=4)
    write_parquet(tmp_path / "src" / "validation-00000-of-00001.parquet", rows[6:9], None)
    out = tmp_path / "out"
    assert prep.main([str(tmp_path / "src"), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    count = 1 + max(label for *_, label in rows[:9])
    assert _classes(out) == [[str(i), f"c{i:04d}", f"c{i:04d}"] for i in range(count)]  # names: the folders
    excluded = {_stem(n) for n in spec.excluded}
    names = sorted(Path(line.split()[0]).name for line in (out / "train.txt").read_text().splitlines())
    assert names == sorted(f"train-00000-of-00001_{i:07d}.JPEG" for i, (_, data, _) in enumerate(rows[:6])
                           if data is not None and _stem_of(data, spec) not in excluded)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"file": f"train/c{rows[3][2]:04d}/train-00000-of-00001_0000003.JPEG", "reason": "empty file"} \
        in manifest["excluded"]
    assert "the source names no classes" in manifest["class_order"]


def _stem_of(data: bytes, spec: MiniImageNet) -> str:
    return _stem(next(name for name, d in spec.data.items() if d == data))


def _bad_parquet(root: Path, spec: MiniImageNet, case: str) -> tuple[Path, Path]:
    """A Hub source with one bad shard; (SRC, the file the error must name)."""
    names = [spec.names[w] for w in spec.wnids]
    rows = _samples(spec, "train", 6)[:4]
    write_parquet(root / "data" / "train-00000-of-00001.parquet", rows, names)
    bad = root / "data" / "validation-00000-of-00001.parquet"
    if case == "no image column":
        pq.write_table(pa.table({"img": pa.array([b"x"]), "label": pa.array([0], pa.int64())}), bad)
    elif case == "label out of range":
        write_parquet(bad, [*rows[:2], ("x.JPEG", rows[0][1], len(names))], names)
    elif case == "nothing matched":
        bad.parent.joinpath("train-00000-of-00001.parquet").rename(bad)
        bad = bad.parent
    return root, bad


def _bad_wds(root: Path, spec: MiniImageNet, case: str) -> tuple[Path, Path]:
    names = [spec.names[w] for w in spec.wnids]
    rows = _samples(spec, "train", 7)[:4]
    write_tar(root / "imagenet1k-train-0000.tar", _wds_members(rows, names))
    bad = root / "imagenet1k-validation-0000.tar"
    members = _wds_members(rows[:2], names)
    if case == "unknown member":
        members.append(("n01440764_1.txt", b"a caption"))
    elif case == "label out of range":
        members += [("x.jpg", rows[0][1]), ("x.cls", b"-1")]
    elif case == "nothing matched":
        (root / "imagenet1k-train-0000.tar").rename(root / "imagenet1k-shard-0000.tar")
        bad = root
    if case != "nothing matched":
        write_tar(bad, members)
    return root, bad


@pytest.mark.parametrize(("layout", "case", "needle"), [
    ("hf-parquet", "no image column", "no 'image' column"),
    ("hf-parquet", "label out of range", "has label 3, outside the 3 ClassLabel names"),
    ("hf-parquet", "nothing matched", "no train-*.parquet shards"),
    ("wds", "unknown member", "member 'n01440764_1.txt' is neither an image"),
    ("wds", "label out of range", "sample 'x' has label -1, outside the class list"),
    ("wds", "nothing matched", "no *train*.tar shards"),
])
def test_bad_sources_exit_2_with_one_line_naming_the_file(tmp_path, spec, capsys, layout, case, needle):
    src, bad = (_bad_parquet if layout == "hf-parquet" else _bad_wds)(tmp_path / "src", spec, case)
    out = tmp_path / "out"
    assert prep.main([str(src), "--out", str(out), "--layout", layout, "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and f"error: {bad}" in err, err
    assert not out.exists()
    if case != "nothing matched":  # the same on auto-detection
        assert prep.main([str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists()


def bench(images: int = 600, workers: int = 2, classes: int = 10, repeats: int = 3) -> None:
    """``python -m tests.test_prepare_sources [IMAGES [WORKERS [CLASSES]]]``: prepare throughput (img/s, median of
    ``repeats``, scan included) from a folder, Parquet shards and WebDataset shards holding the same ``images`` small
    JPEGs (64-160 px sides) in ``classes`` classes, shuffled into shards of 200 (Parquet row groups of 100, as the
    Hub's); "hf-parquet per class" reads the same shards with one task per class instead of one per shard."""
    import contextlib
    import dataclasses
    import statistics
    import sys
    import tempfile
    import time

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    wnids = [f"n{n:08d}" for n in range(classes)]
    colours = rng.integers(30, 220, size=(classes, 3))
    rows: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "val": []}
    for i in range(images):
        label, (h, w) = i % classes, rng.integers(64, 161, size=2)
        pixels = np.clip(colours[label] + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        split = "val" if (i // classes) % 10 == 0 else "train"
        rows[split].append((f"{wnids[label]}_{i}.JPEG", buf.getvalue(), label))
    root = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    names = [f"class {w}" for w in wnids]
    for split, split_rows in rows.items():
        for name, data, label in split_rows:
            (root / "folder" / split / wnids[label]).mkdir(parents=True, exist_ok=True)
            (root / "folder" / split / wnids[label] / name).write_bytes(data)
        shuffled = random.Random(0).sample(split_rows, len(split_rows))
        hub, wds = ("train", "imagenet1k-train") if split == "train" else ("validation", "imagenet1k-validation")
        for n, start in enumerate(range(0, len(shuffled), 200)):
            write_parquet(root / "hf" / "data" / f"{hub}-{n:05d}.parquet", shuffled[start:start + 200], names, 100)
            write_tar(root / "wds" / f"{wds}-{n:04d}.tar", _wds_members(shuffled[start:start + 200], names))
    real = prep.LAYOUTS["hf-parquet"]
    per_class = {"hf-parquet": lambda src, progress: dataclasses.replace(real(src, progress), by_shard=False)}
    runs = [("folder", "folder", {}), ("hf-parquet", "hf", {}), ("hf-parquet per class", "hf", per_class),
            ("wds", "wds", {})]
    print(f"$ python -m tests.test_prepare_sources {images} {workers} {classes}   ({images} images, {classes} classes, "
          f"--workers {workers}, median of {repeats})")
    groups = sum(pq.ParquetFile(p).num_row_groups for p in (root / "hf" / "data").glob("*.parquet"))
    for label, folder, layouts in runs:
        rates, reads, plain = [], [], pq.ParquetFile
        for r in range(repeats):
            out = root / f"out-{folder}-{r}"
            prep.LAYOUTS.update(layouts)
            pq.ParquetFile = _counting_parquet_file(reads) if r == 0 and workers == 1 else plain  # one counted run
            try:
                start = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    code = prep.main([str(root / folder), "--out", str(out), "--workers", str(workers),
                                      "--no-progress"])
                rates.append(images / (time.perf_counter() - start))
            finally:
                prep.LAYOUTS["hf-parquet"] = real
                pq.ParquetFile = plain
                prep._ROW_GROUP.clear()
            if code:
                sys.exit(f"{label}: exit code {code}")
            shutil.rmtree(out)
        read = f"   {len(reads)} row-group reads of the {groups}" if reads else ""
        print(f"{label:>22}: {statistics.median(rates):7.0f} img/s{read}", flush=True)
    shutil.rmtree(root)


if __name__ == "__main__":
    import sys

    bench(*map(int, sys.argv[1:4]))  # IMAGES WORKERS CLASSES
