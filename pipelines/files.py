"""Files: the image formats the project reads, by extension (one table), and writing files so that a reader, or a
crash, never sees half of one: a temporary file (or folder) beside the target, flushed to disk, given the usual mode
and renamed onto the target; removed instead if the writer fails. The one place in the project that renames files
into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What training reads, by format: what DALI's image decoder reads (on the GPU, the formats nvJPEG lacks fall back to
# its CPU decoders). The folder and WebDataset readers, the integrity check, prepare and the error messages use it.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpeg", ".jpg"), "PNG": (".png",), "WebP": (".webp",), "BMP": (".bmp",), "TIFF": (".tif", ".tiff"),
    "JPEG 2000": (".jp2", ".j2k"), "PNM": (".pnm", ".ppm", ".pgm", ".pbm"),
}
IMAGE_EXTENSIONS = tuple(ext for exts in IMAGE_FORMATS.values() for ext in exts)
FORMAT_NAMES = ", ".join(IMAGE_FORMATS)  # for messages: "JPEG, PNG, WebP, ..."
# What prepare reads besides: Pillow decodes it, DALI does not; prepare writes it (as every non-JPEG) as JPEG
CONVERTED_FORMATS: dict[str, tuple[str, ...]] = {"GIF": (".gif",)}
PREPARE_EXTENSIONS = IMAGE_EXTENSIONS + tuple(ext for exts in CONVERTED_FORMATS.values() for ext in exts)


def is_image_name(name: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """A file name with one of ``extensions`` (any case) that is not hidden."""
    return name.lower().endswith(extensions) and not name.startswith(".")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What open() and mkdir() would give; mkstemp's 0600 and mkdtemp's 0700 would hide the files from other users
FILE_MODE = 0o666 & ~_umask()
FOLDER_MODE = 0o777 & ~_umask()


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (by path: torch.save, safetensors, ONNX); when the
    block ends it is synced to disk, given FILE_MODE and renamed onto ``path`` (the folder synced too, so the rename
    survives a power cut). If the block raises, the temporary file is removed and ``path`` is left as it was.
    ``suffix``: for writers that want a particular extension."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` as ``path``: readers see the old file or the new one, never half."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, keys sorted (the run directory's files)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_folder(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` onto ``dst`` (removing what ``dst`` held) by a rename on one file system."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)
    _fsync(dst.parent)


@contextmanager
def atomic_folder(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """An empty temporary folder beside ``path`` for the block to fill; when the block ends it is renamed onto
    ``path``, so a reader sees the old folder (or none) or the whole new one. ``overwrite=False`` leaves a
    non-empty ``path`` alone (the rename then raises OSError: another writer finished first). The files inside are
    not synced one by one; write those that must survive a power cut with ``atomic_file``. If anything raises, the
    temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, FOLDER_MODE)
        yield tmp
        if overwrite:
            replace_folder(tmp, path)
        else:
            os.replace(tmp, path)  # onto a missing or empty folder only
            _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
