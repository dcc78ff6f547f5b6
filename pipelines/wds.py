"""WebDataset shards as a dataset (``--data wds:…``): read in place by DALI's webdataset reader, no extraction.

A sample is ``KEY.jpg`` (or another image extension DALI decodes) and ``KEY.cls`` (its class index as ASCII
digits), optionally ``KEY.json`` (whose ``class_name`` names the class), as timm's ``imagenet-1k-wds`` shards hold.
The forms of ``--data``:

- ``wds:DIR``: the ``*.tar`` shards in DIR; those with ``train`` in their name train, those with ``val`` validate;
- ``wds:PATTERN`` with one ``{train,validation}``-style brace: its first word gives the train shards, its second the
  val shards (``wds:/data/in1k/imagenet1k-{train,validation}-*.tar``).

Each shard's DALI index (``wds2idx``'s format) and its labels are made on first use into the cache folder
(``$VITBUDGET_CACHE/wds-index``), keyed by the shard's path, size and modification time, and reused after.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

from pipelines.files import IMAGE_EXTENSIONS, atomic_file
from pipelines.folder import DatasetError, Split

PREFIX = "wds:"
IMAGE_EXT = ";".join(e[1:] for e in IMAGE_EXTENSIONS) + ";" + ";".join(e[1:].upper() for e in IMAGE_EXTENSIONS)
LABEL_EXT, META_EXT = "cls", "json"


def is_wds(data: str) -> bool:
    return str(data).startswith(PREFIX)


def absolute(spec: str) -> str:
    """The spec with its path made absolute (what a run records, so it reads the same shards from anywhere)."""
    return PREFIX + os.path.abspath(os.path.expanduser(spec[len(PREFIX):]))


def shard_lists(spec: str) -> tuple[list[Path], list[Path]]:
    """The train and val shards a ``wds:`` spec names (DatasetError, one line, if either matches nothing)."""
    text = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    path = Path(text).expanduser()
    if path.is_dir():
        tars = sorted(p for p in path.glob("*.tar"))
        train = [p for p in tars if "train" in p.name]
        val = [p for p in tars if "val" in p.name]
        where = f"{path} (train: *train*.tar, val: *val*.tar)"
    else:
        brace = re.search(r"\{([^{},]+),([^{},]+)\}", text)
        if not brace:
            raise DatasetError(f"--data {spec}: neither a folder of .tar shards nor a pattern with a "
                               "{train,val} brace")
        train, val = ([Path(p) for p in sorted(glob.glob(os.path.expanduser(
            text[:brace.start()] + word + text[brace.end():])))] for word in brace.groups())
        where = text
    for name, found in (("train", train), ("val", val)):
        if not found:
            raise DatasetError(f"--data {spec}: no {name} shards match {where}")
    return train, val


def _cache_dir() -> Path:
    from pipelines.demo_dataset import default_demo_root

    return default_demo_root().parent / "wds-index"


def _key(tar: Path) -> str:
    st = tar.stat()
    return hashlib.sha1(f"{tar.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def index_shard(tar: Path) -> tuple[Path, list[int], dict[int, str]]:
    """(DALI's index file for ``tar``, each sample's label, the class names its .json members give)."""
    cache = _cache_dir()
    key = _key(tar)
    idx, meta = cache / f"{key}.idx", cache / f"{key}.json"
    if idx.is_file() and meta.is_file():
        saved = json.loads(meta.read_text())
        return idx, saved["labels"], {int(k): v for k, v in saved["names"].items()}
    cache.mkdir(parents=True, exist_ok=True)
    from wds2idx import IndexCreator  # DALI's own index maker

    with atomic_file(idx) as tmp:
        with IndexCreator(str(tar), str(tmp), verbose=False) as creator:
            creator.create_index()
        labels, names = _labels(tar, tmp)
    with atomic_file(meta) as tmp:
        tmp.write_text(json.dumps({"shard": str(tar.resolve()), "labels": labels, "names": names}))
    return idx, labels, names


def _labels(tar: Path, idx: Path) -> tuple[list[int], dict[int, str]]:
    """Each sample's label, read at the offsets the index gives; a sample without an image or a label, or with a
    member that is neither, is refused naming the shard and the member."""
    images = {e.lower() for e in IMAGE_EXT.split(";")}
    known = images | {LABEL_EXT, META_EXT}
    labels: list[int] = []
    names: dict[int, str] = {}
    with open(tar, "rb") as f:
        for line in idx.read_text().splitlines()[1:]:
            parts = line.split()
            comps = {parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)}
            member = next(iter(comps.values()))[2]
            unknown = [c[2] for e, c in comps.items() if e.lower() not in known]
            if unknown:
                raise DatasetError(f"{tar}: member {unknown[0]} is neither an image nor a label (.cls, .json)")
            if not any(e.lower() in images for e in comps) or LABEL_EXT not in comps:
                raise DatasetError(f"{tar}: sample {member.rsplit('.', 1)[0]} lacks an image or a .cls label")
            label = _read_int(f, *comps[LABEL_EXT][:2], tar, comps[LABEL_EXT][2])
            labels.append(label)
            if META_EXT in comps and label not in names:
                offset, size, _ = comps[META_EXT]
                f.seek(offset)
                try:
                    name = json.loads(f.read(size)).get("class_name")
                except (ValueError, AttributeError):
                    name = None
                if isinstance(name, str):
                    names[label] = name
    return labels, names


def _read_int(f, offset: int, size: int, tar: Path, member: str) -> int:
    f.seek(offset)
    text = f.read(size).decode("ascii", "replace").rstrip()  # digits first: what the pipeline parses
    if not text.isdigit():
        raise DatasetError(f"{tar}: {member} holds {text[:20]!r}, not a class index")
    return int(text)


def wds_splits(spec: str) -> tuple[Split, Split]:
    """The train and val splits of a ``wds:`` spec, as Splits whose samples DALI's webdataset reader reads."""
    train_tars, val_tars = shard_lists(spec)
    train = _split(train_tars)
    val = _split(val_tars, train.classes)
    return train, val


def _split(tars: list[Path], classes: tuple[str, ...] | None = None) -> Split:
    shards, labels, names = [], [], {}
    for tar in tars:
        idx, shard_labels, shard_names = index_shard(tar)
        shards.append((str(tar), str(idx)))
        labels += shard_labels
        names.update(shard_names)
    if not labels:
        raise DatasetError(f"{tars[0]}: the shards hold no samples")
    if classes is None:  # label order: class i is label i (sorted WNID order in ImageNet's shards)
        count = max(labels) + 1
        classes = tuple(names.get(i, f"class{i:04d}") for i in range(count))
    elif max(labels) >= len(classes):
        raise DatasetError(f"{tars[0].parent}: a val label ({max(labels)}) is outside the {len(classes)} train "
                           "classes")
    # one name per sample (len(split) counts them); not files: a decode error cannot name a member by them
    keys = tuple(f"{tar}#{i}" for tar, (_, idx) in zip(tars, shards, strict=True) for i in range(_count(idx)))
    return Split(root=tars[0].parent, files=keys, labels=tuple(labels), classes=classes, shards=tuple(shards))


def _count(idx: str) -> int:
    """The sample count on the index's first line ("v1.2 N")."""
    with open(idx) as f:
        return int(f.readline().split()[1])


def write_shards(split: Split, out: Path, name: str, per_shard: int = 1000) -> list[Path]:
    """``split`` (a folder's) as WebDataset shards ``out/<name>-NNNN.tar`` in timm's layout: KEY.<ext>, KEY.cls,
    KEY.json with the class name. Samples go in the split's order; each shard is written whole, then renamed."""
    import io
    import tarfile

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, start in enumerate(range(0, len(split), per_shard)):
        path = out / f"{name}-{n:04d}.tar"
        with atomic_file(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + per_shard, len(split))):
                file, label = split.files[i], split.labels[i]
                members = {Path(file).suffix.lower().lstrip("."): Path(file).read_bytes(),
                           LABEL_EXT: str(label).encode(),
                           META_EXT: json.dumps({"class_name": split.classes[label]}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        written.append(path)
    return written
