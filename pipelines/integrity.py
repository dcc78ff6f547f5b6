"""Find which image file broke a pipeline: DALI's decode errors often do not name the file."""

from __future__ import annotations

import os
from collections.abc import Iterable

from PIL import Image

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PNG_START = b"\x89PNG\r\n\x1a\n"


def structural_problem(path: str) -> str | None:
    """A cheap check (two small reads): empty, not a JPEG/PNG, or a JPEG cut short. None if it looks whole."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head.startswith(PNG_START):
        return None
    if not head.startswith(JPEG_START):
        return "not a JPEG or PNG"
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
