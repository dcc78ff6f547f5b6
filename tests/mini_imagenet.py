"""A miniature ImageNet in three source layouts, for testing the dataset preparation tool.

Plain helper module (no fixtures), imported as ``from tests.mini_imagenet import ...`` (tests/ is a package).

``make_mini_imagenet()`` returns a ``MiniImageNet`` holding every file's bytes plus the facts a prepared copy must
show; ``write_ilsvrc`` / ``write_kaggle`` / ``write_folder`` lay the same files out as the official ILSVRC2012 tars,
the Kaggle "imagenet-object-localization-challenge" tree, or plain ``train/<wnid>`` + ``val/<wnid>`` folders.
Each class has one dominant colour, so a decoded RGB image's brightest channel names its class.
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

# Sorted by WNID. ILSVRC2012_IDs are deliberately NOT in sorted-WNID order (real ids of these are 449, 450, 391).
CLASSES = {
    "n01440764": ("tench, Tinca tinca", (200, 30, 30), 2),
    "n01443537": ("goldfish, Carassius auratus", (30, 200, 30), 3),
    "n01484850": ("great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
                  (30, 30, 200), 1),
}
# Non-leaf synsets as in the real meta.mat (ids above the leaves): (id, wnid, words, children ids, height).
NON_LEAVES = [(4, "n02512053", "fish", [1, 2, 3], 1), (5, "n00001740", "entity", [4], 2)]
UNSAFE_KINDS = ("dotdot", "symlink", "absolute")


@dataclass
class MiniImageNet:
    """All files (basename -> bytes) and the facts a correct preparation must reproduce."""

    wnids: list[str]  # sorted
    names: dict[str, str]  # wnid -> human-readable name
    colours: dict[str, tuple[int, int, int]]  # wnid -> dominant RGB colour
    ilsvrc_ids: dict[str, int]  # wnid -> ILSVRC2012_ID in meta.mat (scrambled w.r.t. sorted order)
    train: dict[str, str]  # basename -> wnid, every train file including bad ones
    val: dict[str, str]  # basename -> wnid, every val file; ILSVRC2012_val_%08d.JPEG numbered 1..N
    repaired: dict[str, str] = field(default_factory=dict)  # basename -> "cmyk" | "png": must be re-encoded
    grayscale: set[str] = field(default_factory=set)  # single-channel JPEGs (kept; colour checks must skip them)
    excluded: set[str] = field(default_factory=set)  # undecodable (truncated) files that must be dropped
    data: dict[str, bytes] = field(default_factory=dict, repr=False)  # basename -> file bytes
    seed: int = 0


def _pixels(rng: np.random.Generator, colour: tuple[int, int, int]) -> np.ndarray:
    h, w = rng.integers(40, 121, size=2)
    noise = rng.normal(0, 20, size=(h, w, 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, kind: str = "rgb") -> bytes:
    """Encode as RGB / CMYK / grayscale JPEG, a PNG (to be given a .JPEG name) or a JPEG cut to half its length."""
    img, buf = Image.fromarray(pixels), io.BytesIO()
    if kind == "png":
        img.save(buf, "PNG")
    else:
        img = {"cmyk": img.convert("CMYK"), "gray": img.convert("L")}.get(kind, img)
        img.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


def make_mini_imagenet(train_per_class: int = 4, val_per_class: int = 2, seed: int = 0) -> MiniImageNet:
    """Build the deterministic miniature dataset (in memory).

    Besides the good images, train gets one CMYK JPEG (class 0), one PNG named .JPEG (class 1), one grayscale JPEG
    (class 2) and one truncated JPEG (class 0); val gets one CMYK JPEG among its shuffled images.
    """
    rng = np.random.default_rng(seed)
    wnids = sorted(CLASSES)
    spec = MiniImageNet(wnids=wnids, names={w: CLASSES[w][0] for w in wnids},
                        colours={w: CLASSES[w][1] for w in wnids}, ilsvrc_ids={w: CLASSES[w][2] for w in wnids},
                        train={}, val={}, seed=seed)
    bad = {0: ["cmyk", "truncated"], 1: ["png"], 2: ["gray"]}
    for c, wnid in enumerate(wnids):
        for k, kind in enumerate(["rgb"] * train_per_class + bad.get(c, []), start=1):
            name = f"{wnid}_{k}.JPEG"
            spec.train[name], spec.data[name] = wnid, _encode(_pixels(rng, spec.colours[wnid]), kind)
            _record(spec, name, kind)
    val_items = [(w, "rgb") for w in wnids for _ in range(val_per_class)] + [(wnids[1], "cmyk")]
    for i, j in enumerate(rng.permutation(len(val_items)), start=1):
        wnid, kind = val_items[j]
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        spec.val[name], spec.data[name] = wnid, _encode(_pixels(rng, spec.colours[wnid]), kind)
        _record(spec, name, kind)
    return spec


def _record(spec: MiniImageNet, name: str, kind: str) -> None:
    if kind in ("cmyk", "png"):
        spec.repaired[name] = kind
    elif kind == "gray":
        spec.grayscale.add(name)
    elif kind == "truncated":
        spec.excluded.add(name)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_600_000_000
    tf.addfile(info, io.BytesIO(data))


def _add_unsafe(tf: tarfile.TarFile, kind: str) -> None:
    """Add one malicious member: ../escaped.JPEG, a symlink link.JPEG -> /etc/passwd, or /tmp/abs.JPEG."""
    if kind == "symlink":
        info = tarfile.TarInfo("link.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    elif kind in ("dotdot", "absolute"):
        _add(tf, "../escaped.JPEG" if kind == "dotdot" else "/tmp/abs.JPEG", _encode(np.zeros((8, 8, 3), np.uint8)))
    else:
        raise ValueError(f"unknown unsafe kind {kind!r}; expected one of {UNSAFE_KINDS}")


def _tar_bytes(members: list[tuple[str, bytes]], unsafe: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            _add(tf, name, data)
        if unsafe:
            _add_unsafe(tf, unsafe)
    return buf.getvalue()


def write_unsafe_tar(path: Path, kind: str) -> Path:
    """Write an uncompressed tar with one normal JPEG (ok.JPEG) and one malicious member of the given kind."""
    ok = _encode(np.full((16, 16, 3), (200, 30, 30), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar_bytes([("ok.JPEG", ok)], unsafe=kind))
    return path


def _meta_mat(spec: MiniImageNet) -> bytes:
    """meta.mat as in the devkit: a 1-by-N struct array ``synsets``, leaves first (ids 1..3), then non-leaves."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(spec.ilsvrc_ids[w], w, spec.names[w], f"gloss of {w}", [], 0, sum(v == w for v in spec.train.values()))
            for w in spec.wnids]
    rows += [(i, w, words, f"gloss of {w}", kids, h, 0) for i, w, words, kids, h in NON_LEAVES]
    rows.sort(key=lambda r: r[0])
    synsets = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for j, (i, w, words, gloss, kids, height, n) in enumerate(rows):
        children = np.array(kids, dtype=np.uint16).reshape(1, -1)
        synsets[0, j] = (np.uint16(i), w, words, gloss, np.uint16(len(kids)), children, np.uint8(height),
                         np.uint16(n))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def write_ilsvrc(root: Path, spec: MiniImageNet, unsafe: tuple[str, str] | None = None) -> Path:
    """Write the three official files (train tar of per-class tars, flat val tar, devkit) into ``root``.

    ``unsafe=("outer"|"inner", kind)`` adds a malicious member to the outer train tar or to the first class's tar.
    """
    root.mkdir(parents=True, exist_ok=True)
    where, kind = unsafe or (None, None)
    inner = [(f"{w}.tar", _tar_bytes([(n, spec.data[n]) for n, c in sorted(spec.train.items()) if c == w],
                                     unsafe=kind if where == "inner" and w == spec.wnids[0] else None))
             for w in spec.wnids]
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(inner, unsafe=kind if where == "outer" else None))
    val = sorted(spec.val)
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes([(n, spec.data[n]) for n in val]))
    truth = "".join(f"{spec.ilsvrc_ids[spec.val[n]]}\n" for n in val).encode()
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(spec))
        _add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return root


def _write_files(folder: Path, spec: MiniImageNet, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(spec.data[name])


def write_kaggle(root: Path, spec: MiniImageNet) -> Path:
    """Write the Kaggle layout: ILSVRC/Data/CLS-LOC/{train/<wnid>,val,test}, LOC_val_solution.csv, synset mapping."""
    cls_loc = root / "ILSVRC" / "Data" / "CLS-LOC"
    for w in spec.wnids:
        _write_files(cls_loc / "train" / w, spec, [n for n, c in spec.train.items() if c == w])
    _write_files(cls_loc / "val", spec, list(spec.val))
    (cls_loc / "test").mkdir(parents=True, exist_ok=True)
    test_jpeg = _encode(np.full((32, 32, 3), 128, np.uint8))
    (cls_loc / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes(test_jpeg)
    rng = np.random.default_rng(spec.seed + 1)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name in reversed(sorted(spec.val)):  # the real file is not sorted either
            boxes = [" ".join(map(str, [spec.val[name], *lo, *(lo + rng.integers(5, 30, 2))]))
                     for lo in rng.integers(0, 20, size=(rng.integers(1, 3), 2))]  # wnid xmin ymin xmax ymax
            writer.writerow([name.removesuffix(".JPEG"), " ".join(boxes)])
    mapping = "".join(f"{w} {spec.names[w]}\n" for w in spec.wnids)
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return root


def write_folder(root: Path, spec: MiniImageNet) -> Path:
    """Write the plain class-folder layout: train/<wnid>/<files> and val/<wnid>/<files>."""
    for split, labels in (("train", spec.train), ("val", spec.val)):
        for w in spec.wnids:
            _write_files(root / split / w, spec, [n for n, c in labels.items() if c == w])
    return root
