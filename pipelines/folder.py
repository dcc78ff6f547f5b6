"""Index an ImageNet-layout folder (split/<class>/<image>) into file and label lists for DALI's file reader."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.files import IMAGE_EXTENSIONS, is_image_name

LAYOUT_HINT = "expected DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG"


class DatasetError(ValueError):
    """The data folder cannot be used; the message is one line naming the folder or file."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset: absolute file paths, their labels, and the class names labels index into."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    # Pre-resized copies of this split (vit-prepare --max-size 96,192,full): (the copy's largest
    # shorter side in px, the copy's folder for this split). The same relative files, smaller JPEGs.
    copies: tuple[tuple[int, Path], ...] = ()
    # Files in the split's folders that are not images DALI reads: (extension, count), most first
    skipped: tuple[tuple[str, int], ...] = ()
    # WebDataset shards (pipelines/wds.py): (tar, DALI index) pairs DALI's webdataset reader reads; ``files`` then
    # names the samples
    shards: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def for_stage(self, image_size: int, source_ratio: float) -> Split:
        """The smallest copy whose shorter side is at least ``source_ratio`` x ``image_size`` (else this split)."""
        fits = [(px, folder) for px, folder in self.copies if px >= source_ratio * image_size]
        if not fits:
            return self
        _, folder = min(fits)
        cut = len(str(self.root))
        return replace(self, root=folder, files=tuple(str(folder) + f[cut:] for f in self.files), copies=())


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "(no extension)"


def describe_skipped(skipped: tuple[tuple[str, int], ...]) -> str:
    """'skipped 20 files: .webp 18, .txt 2' (or '' when nothing was)."""
    if not skipped:
        return ""
    total = sum(n for _, n in skipped)
    return f"skipped {total} file{'s' * (total != 1)}: " + ", ".join(f"{ext} {n}" for ext, n in skipped)


def index_split(root: Path, split: str, classes: tuple[str, ...] | None = None) -> Split:
    """Index ``root/split``. Labels are positions in ``classes`` (default: the sorted class folders).

    A prepared dataset's ``root/<split>.txt`` (lines "relative/path label") is used when present, so a
    1.28M-file split is not walked at every start.
    """
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{root} has no {split}/ folder ({LAYOUT_HINT})")
    found = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")))
    if not found:
        raise DatasetError(f"{folder} has no class subfolders ({LAYOUT_HINT})")
    if classes is None:
        classes = found
    elif unknown := sorted(set(found) - set(classes)):
        raise DatasetError(f"{folder} has class folders that train/ lacks: {', '.join(unknown[:5])}")
    listing = root / f"{split}.txt"
    files: list[str] = []
    labels: list[int] = []
    skipped: Counter[str] = Counter()
    if listing.is_file():
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rel, label = line.rsplit(maxsplit=1)
                files.append(str(root / rel))
                labels.append(int(label))
            except ValueError:
                raise DatasetError(f"{listing}:{n}: expected 'relative/path label', got {line!r}") from None
    else:
        index = {name: i for i, name in enumerate(classes)}
        for name in found:
            class_dir = folder / name
            entries = [e.name for e in os.scandir(class_dir) if e.is_file()]
            images = sorted(n for n in entries if is_image_name(n))
            files.extend(str(class_dir / f) for f in images)
            labels.extend([index[name]] * len(images))
            skipped.update(_extension(n) for n in entries if not is_image_name(n))
        skipped.update(_extension(e.name) for e in os.scandir(folder) if e.is_file())  # outside the class folders
    if not files:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)} files in its class folders)"
                           + (f"; {describe_skipped(tuple(skipped.most_common()))}" if skipped else ""))
    return Split(root=folder, files=tuple(files), labels=tuple(labels), classes=tuple(classes),
                 copies=_copies(root, split) if listing.is_file() else (), skipped=tuple(skipped.most_common()))


def _copies(root: Path, split: str) -> tuple[tuple[int, Path], ...]:
    """The smaller copies that ``root/manifest.json`` (written by vit-prepare) lists."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return ()
    try:
        entries = json.loads(manifest.read_text()).get("copies", [])
        copies = tuple((int(c["max_size"]), root / c["path"] / split) for c in entries
                       if c.get("max_size") is not None and c.get("path") not in (None, "", "."))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise DatasetError(f"{manifest}: unreadable 'copies' list; prepare the dataset again") from None
    for _, folder in copies:
        if not folder.is_dir():
            raise DatasetError(f"{manifest} lists a copy at {folder}, which is missing")
    return copies


def index_dataset(root: Path) -> tuple[Split, Split]:
    """Index the train and val splits of ``root``; val labels use train's class order."""
    if not root.exists():
        raise DatasetError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    if (root / ".prepare-work").is_dir() and not (root / "manifest.json").is_file():
        raise DatasetError(f"{root} is an unfinished vit-prepare output; rerun the same command to finish it")
    train = index_split(root, "train")
    val = index_split(root, "val", classes=train.classes)
    return train, val
