"""Prepare ImageNet once, checking every image, into the layout the trainer reads fastest.

    vit-prepare SRC --out DST [--layout auto|ilsvrc|kaggle|folder|hf-parquet|wds] [--max-size 256 | 96,192,full]
                [--quality 90] [--subset-classes K] [--per-class N] [--seed 0] [--workers N] [--link]

(``python tools/prepare_imagenet.py`` in a checkout is the same program.)

SRC is one of:
  ilsvrc  the official files: ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar and
          ILSVRC2012_devkit_t12.tar.gz (val labels as ILSVRC2012 ids; data/meta.mat maps them to WNIDs).
          The tars are read in place, member by member: nothing is extracted to a temporary place.
  kaggle  ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, LOC_val_solution.csv and LOC_synset_mapping.txt.
  folder  an extracted ImageFolder: train/<class>/ and val/<class>/.
  hf-parquet  the Hugging Face Hub's ILSVRC/imagenet-1k: data/train-*.parquet and data/validation-*.parquet (or
          the same files directly in SRC; test-* shards are ignored), columns image {bytes, path} and label. Read with
          pyarrow, one row group at a time: one worker task per shard reads each row group once (a class's images
          may lie in every row group, so per-class tasks could read each row group once per class it holds).
  wds     WebDataset tar shards, as timm/imagenet-1k-wds: *train*.tar and *val*.tar (or *validation*) in SRC, each
          sample a KEY.jpg (or another extension of pipelines.files.PREPARE_EXTENSIONS), KEY.cls (the label, an
          integer) and an optional KEY.json ({"label": ..., "class_name": ...}). The images are read in place from the
          tars, as for ilsvrc.

Images are the files with an extension training reads (pipelines.files.IMAGE_FORMATS: JPEG, PNG, WebP, BMP, TIFF,
JPEG 2000, PNM) or a GIF (Pillow reads it, DALI does not: it is re-encoded as JPEG like every non-JPEG).

DST gets train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, train.txt and val.txt ("relative/path label" per line),
classes.txt ("index<TAB>wnid<TAB>name"; indices in sorted-WNID order, as torchvision's ImageNet and timm's heads)
and manifest.json (counts, repairs, exclusions, options and the class order), the lists and the manifest last.

Class order of hf-parquet and wds: these sources carry integer labels and no WNIDs, so the label index is the class
index (ImageNet-1k's labels are its classes in sorted-WNID order, the order above) and the class folders are named
after it, zero-padded so that their sorted order is the label order: train/c0000/ holds label 0, train/c0999/
label 999 (classes.txt: "0<TAB>c0000<TAB>tench, Tinca tinca"). The human-readable names come from the Parquet
schema's ClassLabel names (metadata key "huggingface") or the shards' .json class_name; without them the folder name
is repeated. Every class of the ClassLabel list gets its folders, images or not, so that a partial download keeps
the indices; without a list the classes are 0 to the largest label seen. manifest.json's "class_order" says which
order a preparation used.

Every image is decoded once: CMYK and other non-RGB JPEGs, and non-JPEG content (a PNG named .JPEG), are
re-encoded as JPEG; grayscale JPEGs are kept (the pipeline decodes to RGB); unreadable or truncated files are left
out and listed in the manifest. ``--max-size 96,192,full`` writes one copy per size (the largest in DST, the
others in DST/max-<px>/); the trainer then reads, for each curriculum stage, the smallest copy whose shorter side
is at least ``--source-ratio`` times the stage's image size. A rerun of the same command after an interruption
finishes the classes (hf-parquet: the shards) left; archives holding a member with an absolute path, "..", a link
or a device are refused. Bad input (a Parquet shard without an image column, a shard member that is neither an image
nor a label, a label outside the class list, no shards) stops the job with one line naming the file, before anything
is written.
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import random
import shutil
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps

from pipelines.files import PREPARE_EXTENSIONS, is_image_name, replace_folder, write_text_atomic

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_DATA = Path("ILSVRC/Data/CLS-LOC")
KAGGLE_VAL_LABELS, KAGGLE_SYNSETS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
WORK = ".prepare-work"  # resumable state inside DST; removed once the manifest is written (pipelines.folder knows it)
FORMAT_VERSION = 1
PROG = "vit-prepare"
SPLITS = ("train", "val")
# JPEG codings DALI's decoders (libjpeg-turbo on the CPU, nvJPEG on the GPU) read: baseline, extended and
# progressive Huffman, 8-bit. Lossless, hierarchical and arithmetic-coded JPEGs are re-encoded.
DALI_SOF = {0xC0, 0xC1, 0xC2}


class PrepareError(Exception):
    """Bad arguments or inputs: one line, exit code 2, nothing written."""


class UnsafeArchive(PrepareError):
    """An archive member that could write outside the output (absolute, '..', link, device): the archive is refused."""


@dataclass(frozen=True, slots=True)  # slots: ImageNet's catalog holds 1.33M of these
class Item:
    """One source image: its output name and where its bytes are (a file, or a slice of an uncompressed tar)."""

    name: str
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    @property
    def whole_file(self) -> bool:
        """The bytes are all of ``path`` (so --link can hard-link it)."""
        return not self.offset and self.size < 0


@dataclass(frozen=True, slots=True)
class ParquetItem(Item):
    """An image in a Parquet shard (``path``): row ``row`` of row group ``group`` of its image column."""

    group: int = 0
    row: int = 0

    def read(self) -> bytes:
        return _parquet_images(self.path, self.group)[self.row] or b""

    @property
    def whole_file(self) -> bool:
        return False


@dataclass
class Catalog:
    """What a layout holds: class names, and per split and class the images."""

    layout: str
    names: dict[str, str]  # wnid -> human-readable name
    splits: dict[str, dict[str, list[Item]]]
    in_archive: bool
    unlabeled: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> [(file, reason)]
    order: str = "sorted WNIDs"  # what the class indices follow (the manifest's class_order)
    by_shard: bool = False  # one worker task per source file (its images in file order), not per class


# ----------------------------------------------------------------------------------------------------- archives


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    name = member.name
    kind = None
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        kind = "an absolute path"
    elif ".." in PurePosixPath(name).parts:
        kind = "a '..' path"
    elif member.issym() or member.islnk():
        kind = f"a link (to {member.linkname!r})"
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = "a device or fifo"
    elif member.issparse():
        kind = "a sparse file"
    if kind:
        raise UnsafeArchive(f"{archive}: member {name!r} is {kind}; the whole archive is refused")


def _regular_members(tar: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    """Every member checked first (one unsafe member refuses the archive), then the regular files."""
    members = tar.getmembers()
    for m in members:
        _check_member(m, archive)
    return [m for m in members if m.isfile()]


def _open_plain_tar(path: Path) -> tarfile.TarFile:
    try:
        tar = tarfile.open(path, "r:")  # uncompressed: members can be read in place at their offsets
    except tarfile.ReadError as e:
        raise PrepareError(f"{path}: not an uncompressed tar archive ({e})") from None
    return tar


def _scan_ilsvrc(src: Path, progress: Callable[[str], None]) -> Catalog:
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT):
        if not (src / name).is_file():
            raise PrepareError(f"{src / name} not found (the ilsvrc layout needs {TRAIN_TAR}, {VAL_TAR}, {DEVKIT})")
    names, val_truth = _read_devkit(src / DEVKIT)

    train: dict[str, list[Item]] = {}
    train_path = src / TRAIN_TAR
    with _open_plain_tar(train_path) as outer:
        members = _regular_members(outer, TRAIN_TAR)
        for n, m in enumerate(members, 1):
            if not m.name.endswith(".tar"):
                raise PrepareError(f"{TRAIN_TAR}: member {m.name!r} is not a per-class .tar")
            wnid = PurePosixPath(m.name).name[: -len(".tar")]
            label = f"{TRAIN_TAR}:{m.name}"
            fileobj = outer.extractfile(m)
            try:
                with tarfile.open(fileobj=fileobj, mode="r:") as inner:
                    images = _regular_members(inner, label)
            except tarfile.ReadError as e:
                raise PrepareError(f"{label}: not a tar archive ({e})") from None
            train[wnid] = [Item(PurePosixPath(i.name).name, str(train_path), m.offset_data + i.offset_data, i.size)
                           for i in images]
            if n % 50 == 0 or n == len(members):
                progress(f"checked {n}/{len(members)} class archives in {TRAIN_TAR}")
    unknown = sorted(set(train) - set(names))
    if unknown:
        raise PrepareError(f"{TRAIN_TAR}: class {unknown[0]} is not a leaf synset of {DEVKIT}'s meta.mat")

    val: dict[str, list[Item]] = {w: [] for w in train}
    unlabeled: list[tuple[str, str]] = []
    val_path = src / VAL_TAR
    with _open_plain_tar(val_path) as tar:
        for m in _regular_members(tar, VAL_TAR):
            base = PurePosixPath(m.name).name
            wnid = val_truth.get(_val_index(base))
            if wnid is None:
                unlabeled.append((f"val/{base}", f"no label in {DEVKIT}"))
            elif wnid in val:
                val[wnid].append(Item(base, str(val_path), m.offset_data, m.size))
    return Catalog("ilsvrc", names, {"train": train, "val": val}, in_archive=True, unlabeled={"val": unlabeled})


def _val_index(name: str) -> int | None:
    """ILSVRC2012_val_00000042.JPEG -> 42."""
    stem = name.split(".")[0]
    digits = stem.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else None


def _read_devkit(path: Path) -> tuple[dict[str, str], dict[int, str]]:
    """(wnid -> name for the 1,000 leaf synsets, val image index -> wnid) from the devkit's meta.mat and truth."""
    from scipy.io import loadmat

    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.ReadError, OSError) as e:
        raise PrepareError(f"{path}: not a readable tar archive ({e})") from None
    with tar:
        found = {}
        for m in _regular_members(tar, path.name):
            for want in ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"):
                if m.name.endswith(want):
                    found[want] = tar.extractfile(m).read()
    for want in ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"):
        if want not in found:
            raise PrepareError(f"{path}: no {want} in the devkit")
    try:
        synsets = loadmat(io.BytesIO(found["data/meta.mat"]), squeeze_me=True)["synsets"]
        leaves = {int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]))
                  for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError) as e:
        raise PrepareError(f"{path}: data/meta.mat has no readable synsets table ({e})") from None
    truth = {}
    for n, line in enumerate(found["data/ILSVRC2012_validation_ground_truth.txt"].decode().split(), 1):
        ident = int(line)
        if ident not in leaves:
            raise PrepareError(f"{path}: validation ground truth line {n} names id {ident}, not a leaf synset")
        truth[n] = leaves[ident][0]
    return {wnid: words for wnid, words in leaves.values()}, truth


# ------------------------------------------------------------------------------------------------- extracted trees


def _images_in(folder: Path) -> list[Item]:
    return [Item(e.name, e.path) for e in sorted(os.scandir(folder), key=lambda e: e.name)
            if e.is_file() and is_image_name(e.name, PREPARE_EXTENSIONS)]


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _kaggle_root(src: Path) -> Path | None:
    for root in (src, *(p for p in src.iterdir() if p.is_dir())) if src.is_dir() else ():
        if (root / KAGGLE_DATA / "train").is_dir():
            return root
    return None


def _scan_kaggle(src: Path, progress: Callable[[str], None]) -> Catalog:
    root = _kaggle_root(src)
    if root is None:
        raise PrepareError(f"{src}: no {KAGGLE_DATA}/train/ folder (the kaggle layout)")
    for name in (KAGGLE_SYNSETS, KAGGLE_VAL_LABELS):
        if not (root / name).is_file():
            raise PrepareError(f"{root / name} not found (the kaggle layout needs it)")
    names = {}
    for line in (root / KAGGLE_SYNSETS).read_text().splitlines():
        if line.strip():
            wnid, _, words = line.strip().partition(" ")
            names[wnid] = words.strip()
    wnids = _class_folders(root / KAGGLE_DATA / "train")
    if unknown := sorted(set(wnids) - set(names)):
        raise PrepareError(f"{root / KAGGLE_DATA / 'train'}: class {unknown[0]} is not in {KAGGLE_SYNSETS}")
    train = {}
    for n, wnid in enumerate(wnids, 1):
        train[wnid] = _images_in(root / KAGGLE_DATA / "train" / wnid)
        if n % 100 == 0 or n == len(wnids):
            progress(f"listed {n}/{len(wnids)} train classes")
    labels = {}
    with open(root / KAGGLE_VAL_LABELS, newline="") as f:
        for row in csv.DictReader(f):
            try:
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
            except (KeyError, IndexError, AttributeError):
                raise PrepareError(f"{root / KAGGLE_VAL_LABELS}: expected columns ImageId,PredictionString") from None
    val: dict[str, list[Item]] = {w: [] for w in wnids}
    unlabeled = []
    val_dir = root / KAGGLE_DATA / "val"
    if not val_dir.is_dir():
        raise PrepareError(f"{val_dir} not found (the kaggle layout needs it)")
    for item in _images_in(val_dir):
        wnid = labels.get(item.name.split(".")[0])
        if wnid in val:
            val[wnid].append(item)
        else:
            unlabeled.append((f"val/{item.name}", f"no label in {KAGGLE_VAL_LABELS}" if wnid is None
                              else f"label {wnid} is not a train class"))
    return Catalog("kaggle", names, {"train": train, "val": val}, in_archive=False, unlabeled={"val": unlabeled})


def _scan_folder(src: Path, progress: Callable[[str], None]) -> Catalog:
    for split in SPLITS:
        if not (src / split).is_dir():
            raise PrepareError(f"{src / split} not found (the folder layout is train/<class>/ and val/<class>/)")
    classes = _class_folders(src / "train")
    if not classes:
        raise PrepareError(f"{src / 'train'} has no class folders")
    if unknown := sorted(set(_class_folders(src / "val")) - set(classes)):
        raise PrepareError(f"{src / 'val'} has class folders that train/ lacks: {', '.join(unknown[:5])}")
    splits = {}
    for split in SPLITS:
        splits[split] = {c: _images_in(src / split / c) if (src / split / c).is_dir() else [] for c in classes}
        progress(f"listed {split}/")
    return Catalog("folder", {c: c for c in classes}, splits, in_archive=False, order="sorted class folder names")


# ------------------------------------------------------------------------------------------ labelled shards


def _label_catalog(layout: str, labelled: dict[str, list[tuple[int, Item]]], names: dict[int, str],
                   count: int | None, by_shard: bool) -> Catalog:
    """Images labelled by index -> a Catalog whose class folders (c0000, c0001, ...) sort in label order."""
    if count is None:
        count = 1 + max((label for pairs in labelled.values() for label, _ in pairs), default=-1)
    width = max(4, len(str(count - 1)))
    folders = [f"c{i:0{width}d}" for i in range(count)]
    splits: dict[str, dict[str, list[Item]]] = {s: {f: [] for f in folders} for s in SPLITS}
    for split, pairs in labelled.items():
        for label, item in pairs:
            splits[split][folders[label]].append(item)
    order = (f"label index (class folder c{0:0{width}d} is label 0; ImageNet-1k's labels are in sorted-WNID order)"
             + ("" if names else "; the source names no classes"))
    return Catalog(layout, {f: names.get(i, f) for i, f in enumerate(folders)}, splits, in_archive=True,
                   order=order, by_shard=by_shard)


HF_SPLITS = {"train": ("train-",), "val": ("validation-", "val-")}  # test-* shards: no labels, ignored


def _parquet_shards(src: Path) -> tuple[Path, dict[str, list[Path]]]:
    """(the folder, split -> its shards): SRC/data/ if it holds train or validation shards, else SRC."""
    for folder in (src / "data", src):
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and p.is_file())
        shards = {split: [p for p in files if p.name.startswith(prefixes)] for split, prefixes in HF_SPLITS.items()}
        if any(shards.values()):
            return folder, shards
    return src, {split: [] for split in SPLITS}


def _hf_label_names(metadata: dict | None) -> list[str] | None:
    """The ClassLabel names the Hub stores in the schema metadata (b"huggingface"), or None."""
    try:
        label = json.loads((metadata or {})[b"huggingface"])["info"]["features"]["label"]
        names = label["names"] if label.get("_type") == "ClassLabel" else None
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _parquet_columns(path: Path) -> tuple:
    """The opened shard and (its image column's type) after checking the schema; PrepareError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: not a readable Parquet file ({e})") from None
    schema = shard.schema_arrow
    for column in ("image", "label"):
        if column not in schema.names:
            raise PrepareError(f"{path}: no {column!r} column (the hf-parquet layout needs image and label; "
                               f"found {', '.join(schema.names) or 'none'})")
    image = schema.field("image").type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)
            or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0)):
        raise PrepareError(f"{path}: column 'image' is {image}, not a struct {{bytes, path}} or binary")
    if not pa.types.is_integer(schema.field("label").type):
        raise PrepareError(f"{path}: column 'label' is {schema.field('label').type}, not an integer")
    return shard, image


def _scan_hf_parquet(src: Path, progress: Callable[[str], None]) -> Catalog:
    import pyarrow as pa

    folder, shards = _parquet_shards(src)
    for split, prefixes in HF_SPLITS.items():
        if not shards[split]:
            raise PrepareError(f"{folder}: no {prefixes[0]}*.parquet shards (the hf-parquet layout reads "
                               f"{src / 'data'}/ or {src}/)")
    names: list[str] | None = None
    named_by: Path | None = None
    found: dict[str, list[tuple[int, Path, int, int, str | None]]] = {s: [] for s in SPLITS}
    every = [(split, path) for split in SPLITS for path in shards[split]]
    for n, (split, path) in enumerate(every, 1):
        shard, image = _parquet_columns(path)
        shard_names = _hf_label_names(shard.schema_arrow.metadata)
        if shard_names is not None:
            if names is not None and shard_names != names:
                raise PrepareError(f"{path}: its ClassLabel names differ from those of {named_by}")
            names, named_by = shard_names, path
        has_path = pa.types.is_struct(image) and image.get_field_index("path") >= 0
        try:
            for group in range(shard.num_row_groups):
                table = shard.read_row_group(group, columns=["label", "image.path"] if has_path else ["label"])
                labels = table.column("label").to_pylist()
                paths = ([(v or {}).get("path") for v in table.column("image").to_pylist()] if has_path
                         else [None] * len(labels))
                for row, (label, name) in enumerate(zip(labels, paths, strict=True)):
                    found[split].append((label, path, group, row, name))
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{path}: unreadable ({e})") from None
        if n % 20 == 0 or n == len(every):
            progress(f"scanned {n}/{len(every)} Parquet shards")
    labelled: dict[str, list[tuple[int, Item]]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        stems: set[tuple[int, str]] = set()
        row_of: dict[Path, int] = {}
        for label, path, group, row, name in found[split]:
            if label is None or label < 0 or (names is not None and label >= len(names)):
                limit = f"the {len(names)} ClassLabel names" if names is not None else "the class list"
                raise PrepareError(f"{path}: row group {group} row {row} has label {label}, outside {limit}")
            index = row_of[path] = row_of.get(path, -1) + 1
            base = PurePosixPath(name).name if name else ""
            stem = base.rpartition(".")[0] or base
            if not stem or stem.startswith(".") or (label, stem) in stems:  # stems unique within a class
                base = f"{path.name.removesuffix('.parquet')}_{index:07d}.JPEG"
                stem = base.rpartition(".")[0]
            stems.add((label, stem))
            labelled[split].append((label, ParquetItem(base, str(path), group=group, row=row)))
    if not labelled["train"]:
        raise PrepareError(f"{folder}: the train-*.parquet shards hold no rows")
    return _label_catalog("hf-parquet", labelled, dict(enumerate(names or [])),
                          len(names) if names is not None else None, by_shard=True)


_ROW_GROUP: dict = {}  # this process's current Parquet row group: path, file, group, images


def _parquet_images(path: str, group: int) -> list[bytes | None]:
    """The image bytes of one row group, read once while a worker walks a shard in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if _ROW_GROUP.get("path") != path or _ROW_GROUP.get("group") != group:
        try:
            if _ROW_GROUP.get("path") != path:
                _ROW_GROUP.clear()
                _ROW_GROUP.update(path=path, file=pq.ParquetFile(path))
            shard = _ROW_GROUP["file"]
            struct = pa.types.is_struct(shard.schema_arrow.field("image").type)
            column = shard.read_row_group(group, columns=["image.bytes" if struct else "image"]).column("image")
        except (pa.ArrowException, OSError) as e:
            _ROW_GROUP.clear()
            raise OSError(errno.EIO, f"row group {group} of {path}: {e}") from None
        chunks = [c.flatten()[c.type.get_field_index("bytes")] if struct else c for c in column.chunks]  # null: None
        _ROW_GROUP.update(group=group, images=[v for c in chunks for v in c.to_pylist()])
    return _ROW_GROUP["images"]


WDS_SPLITS = {"train": ("train",), "val": ("val",)}  # "val" also matches "validation"


def _wds_shards(src: Path) -> dict[str, list[Path]]:
    tars = sorted(p for p in src.iterdir() if p.suffix == ".tar" and p.is_file()
                  and p.name not in (TRAIN_TAR, VAL_TAR)) if src.is_dir() else []
    train = [p for p in tars if "train" in p.name.lower()]
    return {"train": train, "val": [p for p in tars if "val" in p.name.lower() and p not in train]}


def _wds_small(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> bytes:
    if member.size > 1 << 20:
        raise PrepareError(f"{shard}: member {member.name!r} is {member.size:,} bytes, too large for a label")
    return tar.extractfile(member).read()


def _wds_samples(path: Path) -> Iterator[tuple[str, dict]]:
    """(key, {"image": (member, ext), "cls": int, "json": dict}) per sample of one shard, in member order."""
    samples: dict[str, dict] = {}
    with _open_plain_tar(path) as tar:
        for m in _regular_members(tar, path.name):
            folder, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")  # WebDataset: the key ends at the basename's first dot
            key, kind = f"{folder}/{stem}" if folder else stem, ext.lower()
            sample = samples.setdefault(key, {})
            if f".{kind}" in PREPARE_EXTENSIONS:
                if "image" in sample:
                    raise PrepareError(f"{path}: sample {key!r} has two images ({sample['image'][0].name!r}, "
                                       f"{m.name!r})")
                sample["image"] = (m, ext)
            elif kind == "cls":
                text = _wds_small(tar, m, path).decode("ascii", "replace").strip()
                try:
                    sample["cls"] = int(text)
                except ValueError:
                    raise PrepareError(f"{path}: member {m.name!r} holds {text[:40]!r}, not an integer label") from None
            elif kind == "json":
                try:
                    meta = json.loads(_wds_small(tar, m, path))
                except ValueError as e:
                    raise PrepareError(f"{path}: member {m.name!r} is not valid JSON ({e})") from None
                if not isinstance(meta, dict):
                    raise PrepareError(f"{path}: member {m.name!r} is not a JSON object")
                sample["json"] = meta
            else:
                raise PrepareError(f"{path}: member {m.name!r} is neither an image ({', '.join(PREPARE_EXTENSIONS)}) "
                                   "nor a label (.cls, .json)")
    yield from samples.items()


def _scan_wds(src: Path, progress: Callable[[str], None]) -> Catalog:
    shards = _wds_shards(src)
    for split, words in WDS_SPLITS.items():
        if not shards[split]:
            raise PrepareError(f"{src}: no *{words[0]}*.tar shards (the wds layout reads WebDataset tars in SRC)")
    names: dict[int, str] = {}
    labelled: dict[str, list[tuple[int, Item]]] = {s: [] for s in SPLITS}
    every = [(split, path) for split in SPLITS for path in shards[split]]
    for n, (split, path) in enumerate(every, 1):
        for key, sample in _wds_samples(path):
            meta = sample.get("json", {})
            cls, also = sample.get("cls"), meta.get("label")
            if cls is not None and also is not None and also != cls:
                raise PrepareError(f"{path}: sample {key!r} has label {cls} in .cls but {also!r} in .json")
            label = cls if cls is not None else also
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                what = ("no label (.cls or .json 'label')" if label is None
                        else f"label {label!r}, outside the class list")
                raise PrepareError(f"{path}: sample {key!r} has {what}")
            if "image" not in sample:
                raise PrepareError(f"{path}: sample {key!r} has no image ({', '.join(PREPARE_EXTENSIONS)})")
            name = meta.get("class_name")
            if isinstance(name, str) and name:
                if names.setdefault(label, name) != name:
                    raise PrepareError(f"{path}: sample {key!r} names class {label} {name!r}, other samples "
                                       f"{names[label]!r}")
            member, ext = sample["image"]
            item = Item(f"{PurePosixPath(key).name}.{ext}", str(path), member.offset_data, member.size)
            labelled[split].append((label, item))
        if n % 20 == 0 or n == len(every):
            progress(f"scanned {n}/{len(every)} WebDataset shards")
    if not labelled["train"]:
        raise PrepareError(f"{src}: the *train*.tar shards hold no samples")
    return _label_catalog("wds", labelled, names, None, by_shard=False)


LAYOUTS = {"ilsvrc": _scan_ilsvrc, "kaggle": _scan_kaggle, "folder": _scan_folder, "hf-parquet": _scan_hf_parquet,
           "wds": _scan_wds}
ARCHIVE_LAYOUTS = ("ilsvrc", "hf-parquet", "wds")  # images read from inside files: nothing to hard-link


def detect_layout(src: Path) -> str:
    if (src / TRAIN_TAR).is_file():
        return "ilsvrc"
    if _kaggle_root(src) is not None:
        return "kaggle"
    if (src / "train").is_dir():
        return "folder"
    if any(_parquet_shards(src)[1].values()):
        return "hf-parquet"
    if any(_wds_shards(src).values()):
        return "wds"
    raise PrepareError(f"{src}: no ImageNet layout found (expected {TRAIN_TAR} and friends, "
                       f"{KAGGLE_DATA}/train/, train/<class>/ and val/<class>/, data/train-*.parquet or "
                       "*train*.tar WebDataset shards); name one with --layout")


# ----------------------------------------------------------------------------------------------------- one image


def _jpeg_coding(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG, from its segment headers; None if none is found."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, data[i + 4] if i + 4 < len(data) else 0
        i += 2 + length
    return None


def _as_rgb_or_gray(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im)  # DALI honours EXIF orientation on originals; re-encoded files carry none
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("1", "I", "I;16", "F"):
        return im.convert("L")
    if im.mode in ("LA", "RGBA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return im.convert("RGB")


def inspect_image(data: bytes) -> tuple[Image.Image | None, str | None, str | None]:
    """Decode ``data`` once: (decoded image, why it must be re-encoded or None, why it is excluded or None)."""
    if not data:
        return None, None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode = im.format, im.mode
            image = im.copy()
            image.info = dict(im.info)
    except Image.DecompressionBombError as e:
        return None, None, f"too large to decode safely ({e})"
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad data
        return None, None, f"cannot be decoded ({str(e) or type(e).__name__})"
    if fmt != "JPEG":
        return image, f"{fmt} content re-encoded as JPEG", None
    if mode not in ("RGB", "L"):
        return image, f"{mode} JPEG re-encoded as {'RGB' if mode != 'I' else 'grayscale'}", None
    coding = _jpeg_coding(data)
    if coding is None or coding[0] not in DALI_SOF or coding[1] != 8:
        what = "no frame header" if coding is None else f"SOF 0x{coding[0]:02X}, {coding[1]}-bit"
        return image, f"JPEG coding DALI does not decode ({what}) re-encoded", None
    return image, None, None


def _shrunk(im: Image.Image, max_short: int) -> Image.Image:
    w, h = im.size
    scale = max_short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# ------------------------------------------------------------------------------------------------------ one class


@dataclass(frozen=True)
class Copy:
    max_size: int | None  # None: full size
    rel: str  # "" for the main copy in DST, else "max-<px>"


def _output_name(name: str, reencoded: bool, used: set[str]) -> str:
    """The file's name in the output: a re-encoded non-JPEG name gets .JPEG; a name already taken in the class
    (two sources with one basename, or x.png renamed onto an x.JPEG) gets a numbered suffix."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if reencoded and ext.lower() not in ("jpeg", "jpg"):
        ext = "JPEG"
    candidate, n = f"{stem}.{ext}" if ext else stem, 1
    while candidate in used:
        candidate = f"{stem}_{n}.{ext}" if ext else f"{stem}_{n}"
        n += 1
    return candidate


def _new_record(split: str, wnid: str) -> dict:
    return {"split": split, "wnid": wnid, "kept": [], "repaired": [], "excluded": [], "resized": 0, "linked": 0}


def _process_item(item: Item, record: dict, folders: list[Path], copies: list[Copy], quality: int, link: bool,
                  used: set[str]) -> None:
    """Check, repair and write one image into its class's work folders, one per copy; ``record`` says what."""
    split, wnid = record["split"], record["wnid"]
    if "\n" in item.name or "\r" in item.name:
        record["excluded"].append((f"{split}/{wnid}/{item.name!r}", "file name holds a line break"))
        return
    try:
        data = item.read()
    except OSError as e:
        record["excluded"].append((f"{split}/{wnid}/{item.name}", f"unreadable ({e.strerror})"))
        return
    image, repair, exclude = inspect_image(data)
    if exclude:
        record["excluded"].append((f"{split}/{wnid}/{item.name}", exclude))
        return
    name = _output_name(item.name, repair is not None, used)
    used.add(name)
    pixels = _as_rgb_or_gray(image) if repair else None
    for copy, folder in zip(copies, folders, strict=True):
        target = folder / name
        small = copy.max_size is not None and min(image.size) > copy.max_size
        if small:
            if pixels is None:
                pixels = _as_rgb_or_gray(image)
            _shrunk(pixels, copy.max_size).save(target, "JPEG", quality=quality)
            record["resized"] += 1
        elif repair:
            pixels.save(target, "JPEG", quality=quality)
        elif link and item.whole_file and _try_link(item.path, target):
            record["linked"] += 1
        else:
            target.write_bytes(data)
    record["kept"].append(name)
    if repair:
        record["repaired"].append((f"{split}/{wnid}/{name}", repair))


def _work_folders(out: str | Path, copies: list[Copy], split: str, wnid: str) -> list[Path]:
    return [Path(out) / WORK / "partial" / (c.rel or "main") / split / wnid for c in copies]


def process_class(split: str, wnid: str, items: list[Item], out: str, copies: list[Copy], quality: int,
                  link: bool) -> dict:
    """Check, repair and write one class of one split into the work folder; returns its record."""
    folders = _work_folders(out, copies, split, wnid)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's half
        folder.mkdir(parents=True)
    record, used = _new_record(split, wnid), set()
    for item in items:
        _process_item(item, record, folders, copies, quality, link, used)
    record["kept"].sort()
    return record


def process_shard(split: str, shard: str, entries: list[tuple[str, Item]], out: str, copies: list[Copy],
                  quality: int, link: bool) -> dict:
    """Check, repair and write the images of one source file (``entries``: (class, item) in file order) into their
    classes' work folders; returns the per-class records. Output names cannot collide with another shard's: the
    scanner made the names' stems unique within each class."""
    classes: dict[str, tuple[list[Path], dict, set[str]]] = {}
    try:
        for wnid, item in entries:
            if wnid not in classes:
                folders = _work_folders(out, copies, split, wnid)
                for folder in folders:
                    folder.mkdir(parents=True, exist_ok=True)
                classes[wnid] = folders, _new_record(split, wnid), set()
            folders, record, used = classes[wnid]
            _process_item(item, record, folders, copies, quality, link, used)
    finally:
        _ROW_GROUP.clear()  # one task reads one shard: nothing to keep for the next
    return {"split": split, "shard": shard, "classes": {w: record for w, (_, record, _) in classes.items()}}


def _try_link(src: str, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:  # another file system, or links not allowed: copy instead
        return False


# --------------------------------------------------------------------------------------------------------- the job


def parse_sizes(text: str) -> list[int | None]:
    """"256" -> [256]; "96,192,full" -> [None, 192, 96] (largest first; None is full size)."""
    sizes: list[int | None] = []
    for token in text.split(","):
        token = token.strip().lower()
        if token == "full":
            sizes.append(None)
        elif token.isdigit() and int(token) >= 16:
            sizes.append(int(token))
        else:
            raise PrepareError(f"--max-size: expected pixel sizes of at least 16 or 'full', got {token!r}")
    if len(set(sizes)) != len(sizes):
        raise PrepareError(f"--max-size: {text!r} lists a size twice")
    return sorted(sizes, key=lambda s: float("inf") if s is None else s, reverse=True)


def make_copies(sizes: list[int | None]) -> list[Copy]:
    return [Copy(s, "" if n == 0 else f"max-{s}") for n, s in enumerate(sizes)]


def select(catalog: Catalog, subset_classes: int | None, per_class: int | None, seed: int) -> list[str]:
    """The classes kept (sorted WNIDs), trimming train to ``per_class`` images each; deterministic in ``seed``."""
    wnids = sorted(catalog.splits["train"])
    if subset_classes is not None:
        if subset_classes > len(wnids):
            raise PrepareError(f"--subset-classes {subset_classes}: the source has only {len(wnids)} classes")
        wnids = sorted(random.Random(seed).sample(wnids, subset_classes))
    if per_class is not None:
        for wnid in wnids:
            items = sorted(catalog.splits["train"][wnid], key=lambda i: i.name)
            if len(items) > per_class:
                rng = random.Random(f"{seed}-{wnid}")
                items = sorted(rng.sample(items, per_class), key=lambda i: i.name)
            catalog.splits["train"][wnid] = items
    return wnids


def _options(args: argparse.Namespace, layout: str) -> dict:
    return {"source": str(Path(args.src).resolve()), "layout": layout, "max_size": args.max_size,
            "quality": args.quality, "subset_classes": args.subset_classes, "per_class": args.per_class,
            "seed": args.seed, "link": args.link}


def _check_out(out: Path, options: dict) -> str:
    """"new", "resume" or "done" for ``out``; PrepareError if it holds something else."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a folder")
    manifest, started = out / "manifest.json", out / WORK / "options.json"
    for path, state in ((manifest, "done"), (started, "resume")):
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
                previous = previous.get("options", previous)
            except ValueError:
                raise PrepareError(f"{path} is not valid JSON; remove --out {out} and start again") from None
            if previous != options:
                diff = sorted(k for k in options if previous.get(k) != options[k])
                raise PrepareError(f"--out {out} holds a {'' if state == 'done' else 'partial '}preparation with other "
                                   f"options ({', '.join(diff)}); rerun with the same options or choose another --out")
            return state
    if out.is_dir() and any(out.iterdir()):
        raise PrepareError(f"--out {out} exists, is not empty and is not a vit-prepare output")
    return "new"


class Progress:
    """A rich progress bar on a terminal; otherwise a plain line every 5% or 30 s."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from rich.console import Console

        self.total, self.done, self.start, self.last = total, 0, time.monotonic(), 0.0
        self.console = Console(stderr=True)
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("preparing"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]} img/s"), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=self.console)
            self.task = self.bar.add_task("images", total=total, rate="-")
            self.bar.start()
        self.enabled = enabled

    def advance(self, n: int) -> None:
        self.done += n
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f}")
        elif self.enabled and (self.done == self.total or elapsed - self.last >= 30
                               or self.done * 20 // max(1, self.total) != (self.done - n) * 20 // max(1, self.total)):
            self.last = elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"prepared {self.done:,}/{self.total:,} images, {rate:,.0f} img/s, ETA {eta:,.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _finish_class(out: Path, copies: list[Copy], record: dict) -> None:
    """Move a finished class from the work folder into place in every copy, then record it as done."""
    split, wnid = record["split"], record["wnid"]
    for copy in copies:
        src = out / WORK / "partial" / (copy.rel or "main") / split / wnid
        dst = out / copy.rel / split / wnid
        dst.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(src, dst)
    (out / WORK / "done" / split).mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / WORK / "done" / split / f"{wnid}.json", json.dumps(record))


Task = tuple[Callable[..., dict], tuple, int]  # (worker function, its leading arguments, its images)


def _shard_record(out: Path, split: str, shard: str) -> Path:
    return out / WORK / "shards" / split / f"{Path(shard).name}.json"


def _tasks(catalog: Catalog, wnids: list[str], out: Path) -> list[Task]:
    """The work not done yet: one task per class and split, or (by_shard layouts) per source file and split."""
    if not catalog.by_shard:
        return [(process_class, (split, wnid, items), len(items))
                for split in SPLITS for wnid in wnids if not (out / WORK / "done" / split / f"{wnid}.json").is_file()
                for items in [catalog.splits[split].get(wnid, [])]]
    tasks: list[Task] = []
    for split in SPLITS:
        shards: dict[str, list[tuple[str, Item]]] = {}
        for wnid in wnids:
            for item in catalog.splits[split].get(wnid, []):
                shards.setdefault(item.path, []).append((wnid, item))
        for shard, entries in sorted(shards.items()):
            if not _shard_record(out, split, shard).is_file():
                entries.sort(key=lambda e: (getattr(e[1], "group", 0), getattr(e[1], "row", 0), e[1].offset))
                tasks.append((process_shard, (split, shard, entries), len(entries)))
    return tasks


def _task_done(out: Path, copies: list[Copy], result: dict) -> None:
    if "shard" in result:
        path = _shard_record(out, result["split"], result["shard"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result))
    else:
        _finish_class(out, copies, result)


def _finish_shards(out: Path, copies: list[Copy], wnids: list[str]) -> None:
    """Once every shard is written: merge the shards' records of each class, then move the class into place."""
    for split in SPLITS:
        folder = out / WORK / "shards" / split
        shards = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        for wnid in wnids:
            if (out / WORK / "done" / split / f"{wnid}.json").is_file():
                continue
            record = _new_record(split, wnid)
            for part in (shard["classes"][wnid] for shard in shards if wnid in shard["classes"]):
                for key in ("kept", "repaired", "excluded"):
                    record[key] += part[key]
                record["resized"] += part["resized"]
                record["linked"] += part["linked"]
            record["kept"].sort()
            kept = set(record["kept"])
            for work in _work_folders(out, copies, split, wnid):
                work.mkdir(parents=True, exist_ok=True)  # a class without images still gets its folders
                for entry in os.scandir(work):
                    if entry.name not in kept:  # left by a shard attempt that was cut short
                        os.remove(entry.path)
            _finish_class(out, copies, record)


def _run_units(tasks: list[Task], out: Path, copies: list[Copy], args: argparse.Namespace,
               progress: Progress) -> None:
    job = dict(out=str(out), copies=copies, quality=args.quality, link=args.link)
    if args.workers <= 1:
        for function, leading, images in tasks:
            _task_done(out, copies, function(*leading, **job))
            progress.advance(images)
        return
    pool = ProcessPoolExecutor(args.workers, initializer=_ignore_sigint)
    try:
        pending = {pool.submit(function, *leading, **job): images for function, leading, images in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                _task_done(out, copies, future.result())
                progress.advance(pending.pop(future))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _lines(records: Iterable[dict], split: str, wnids: list[str]) -> str:
    index = {w: i for i, w in enumerate(wnids)}
    return "".join(f"{split}/{r['wnid']}/{name} {index[r['wnid']]}\n"
                   for r in sorted(records, key=lambda r: r["wnid"]) for name in r["kept"])


def prepare(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """The whole job; returns the manifest. Raises PrepareError on bad input (nothing written)."""
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise PrepareError(f"SRC {src} is not a folder")
    if not 1 <= args.quality <= 100:
        raise PrepareError(f"--quality must be 1..100, got {args.quality}")
    for flag in ("subset_classes", "per_class", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise PrepareError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    copies = make_copies(parse_sizes(args.max_size))
    layout = args.layout if args.layout != "auto" else detect_layout(src)
    inside = out.resolve()
    for tree in (src, src / "train", src / "val", src / "ILSVRC"):
        if inside == tree.resolve() or (tree != src and tree.resolve() in inside.parents):
            raise PrepareError(f"--out {out} lies in the source tree {tree}; choose a folder outside it")
    if args.link and layout in ARCHIVE_LAYOUTS:
        log(f"--link: the {layout} layout is read from inside its files, so every file is written (nothing to link)")
    options = _options(args, layout)
    state = _check_out(out, options)
    if state == "done":
        log(f"{out} is already prepared (manifest.json); nothing to do")
        return json.loads((out / "manifest.json").read_text())

    start = time.monotonic()
    quiet = not args.progress
    catalog = LAYOUTS[layout](src, (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    wnids = select(catalog, args.subset_classes, args.per_class, args.seed)

    (out / WORK).mkdir(parents=True, exist_ok=True)
    if state == "new":
        write_text_atomic(out / WORK / "options.json", json.dumps(options, indent=2))
    tasks = _tasks(catalog, wnids, out)
    todo = sum(images for *_, images in tasks)
    total = sum(len(catalog.splits[s].get(w, [])) for s in SPLITS for w in wnids)
    log(f"{layout} layout, {len(wnids)} classes (class order: {catalog.order}), {total:,} images; "
        + (f"resuming: {todo:,} left" if state == "resume" else f"writing {out}"))
    progress = Progress(todo, enabled=args.progress)
    try:
        _run_units(tasks, out, copies, args, progress)
    finally:
        progress.close()
    if catalog.by_shard:
        _finish_shards(out, copies, wnids)

    records = {s: [json.loads((out / WORK / "done" / s / f"{w}.json").read_text()) for w in wnids] for s in SPLITS}
    manifest = _manifest(catalog, wnids, records, copies, options, time.monotonic() - start, state)
    classes = "".join(f"{i}\t{w}\t{catalog.names.get(w, w)}\n" for i, w in enumerate(wnids))
    for copy in copies:  # every copy is a dataset of its own; the lists and manifest appear last
        root = out / copy.rel
        for split in SPLITS:
            write_text_atomic(root / f"{split}.txt", _lines(records[split], split, wnids))
        write_text_atomic(root / "classes.txt", classes)
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out / WORK, ignore_errors=True)
    return manifest


def _manifest(catalog: Catalog, wnids: list[str], records: dict[str, list[dict]], copies: list[Copy], options: dict,
              seconds: float, state: str) -> dict:
    repaired = [{"file": f, "reason": r} for s in SPLITS for rec in records[s] for f, r in rec["repaired"]]
    excluded = [{"file": f, "reason": r} for s in SPLITS for rec in records[s] for f, r in rec["excluded"]]
    excluded += [{"file": f, "reason": r} for s in SPLITS for f, r in catalog.unlabeled.get(s, [])]
    departures = []
    if copies[0].max_size is not None:
        departures.append(f"images pre-resized to a shorter side of at most {copies[0].max_size} px "
                          "(the standard protocol decodes full-size images)")
    if options["subset_classes"] is not None:
        departures.append(f"{options['subset_classes']} of the source's classes")
    if options["per_class"] is not None:
        departures.append(f"at most {options['per_class']} train images per class")
    return {
        "format": FORMAT_VERSION,
        "options": options,
        "classes": len(wnids),
        "class_order": catalog.order,
        "counts": {s: sum(len(r["kept"]) for r in records[s]) for s in SPLITS},
        "per_class": {s: {r["wnid"]: len(r["kept"]) for r in records[s]} for s in SPLITS},
        "repaired": repaired,
        "excluded": excluded,
        "resized": sum(r["resized"] for s in SPLITS for r in records[s]),
        "linked": sum(r["linked"] for s in SPLITS for r in records[s]),
        "copies": [{"max_size": c.max_size, "path": c.rel or "."} for c in copies],
        "departures": departures,
        "seconds_last_attempt": round(seconds, 1),
        "resumed": state == "resume",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the folder holding the archives or the extracted tree")
    p.add_argument("--out", required=True, help="the prepared dataset's folder (created; resumed if unfinished)")
    p.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    p.add_argument("--max-size", default="full",
                   help="pre-resize so the shorter side is at most PX; several sizes (96,192,full) write one copy "
                        "each (default: full, no resizing)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded and resized images")
    p.add_argument("--subset-classes", type=int, default=None, metavar="K", help="keep K classes (seeded choice)")
    p.add_argument("--per-class", type=int, default=None, metavar="N", help="keep N train images per class (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --subset-classes and --per-class choices")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--link", action="store_true",
                   help="hard-link unchanged files instead of copying them (extracted sources only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")
    return p.parse_args(argv)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as an interrupt: finished classes are kept for the rerun."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool and keeps the finished classes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        manifest = prepare(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except PrepareError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{PROG}: interrupted; rerun the same command to finish {args.out}", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    counts = manifest["counts"]
    print(f"{args.out}: {manifest['classes']} classes, {counts['train']:,} train and {counts['val']:,} val images; "
          f"{len(manifest['repaired'])} repaired, {len(manifest['excluded'])} excluded (see manifest.json)")
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
