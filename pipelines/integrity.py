"""Find which image file broke a pipeline: DALI's decode errors often do not name the file."""

from __future__ import annotations

import os
from collections.abc import Iterable

from PIL import Image

from pipelines.files import FORMAT_NAMES

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PNG_START = b"\x89PNG\r\n\x1a\n"
# The other formats DALI's decoder reads, by their first bytes: BMP, TIFF (both byte orders), JPEG 2000 (file and
# codestream), PNM (P1..P6); WebP is RIFF....WEBP
OTHER_STARTS = (b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51",
                *(b"P%d" % n for n in range(1, 7)))


def structural_problem(path: str) -> str | None:
    """A cheap check (two small reads): empty, not an image format DALI decodes (pipelines.files.IMAGE_FORMATS),
    or a JPEG cut short. None if it looks whole (formats other than JPEG are checked by their first bytes only)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head.startswith((PNG_START, *OTHER_STARTS)) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    if not head.startswith(JPEG_START):
        return f"not an image format DALI decodes ({FORMAT_NAMES})"
    if JPEG_END not in tail.rstrip(b"\x00 \r\n"):
        return "truncated JPEG (no end marker)"
    return None


def decode_problem(path: str) -> str | None:
    """Full decode with Pillow; None if it decodes."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # Pillow raises many types for bad data
        return f"cannot be decoded ({e})"
    return None


def find_broken_image(files: Iterable[str], full_decode_limit: int = 5000) -> tuple[str, str] | None:
    """The first file that fails the structural check, else (for small lists) a full decode; or None."""
    files = list(files)
    for path in files:
        if problem := structural_problem(path):
            return path, problem
    if len(files) <= full_decode_limit:
        for path in files:
            if problem := decode_problem(path):
                return path, problem
    return None
