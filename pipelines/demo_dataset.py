"""Generate the small synthetic ImageNet-layout JPEG dataset behind ``vit-train --data demo``.

Each class is a texture family that fills the whole image, so any random-resized crop
(and its mirror image) still shows the label; colours, scale, phase, a shape overlay and
noise are randomised per image so the classes cannot be told apart by colour alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.files import atomic_folder

GENERATOR_VERSION = 1
INFO_NAME = "DEMO_INFO.json"
JPEG_QUALITY = 88

# The numeric prefix keeps sorted order (= label order) equal to the order below.
CLASS_NAMES: tuple[str, ...] = (
    "n00_hstripes",
    "n01_vstripes",
    "n02_diagonal",
    "n03_checker",
    "n04_dots",
    "n05_rings",
    "n06_blobs",
    "n07_grid",
    "n08_zigzag",
    "n09_speckle",
)
_SPLITS = ("train", "val")


def _colour(rng: np.random.Generator, luma: tuple[float, float], hue: float) -> np.ndarray:
    # Sampling in luma/chroma space keeps the two colours apart in brightness, so the
    # pattern survives the grayscale conversion.
    y = rng.uniform(*luma)
    chroma = rng.uniform(0.05, 0.35)
    cb, cr = chroma * np.cos(hue), chroma * np.sin(hue)
    rgb = [y + 1.402 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.772 * cb]
    return np.clip(np.array(rgb, dtype=np.float32), 0.0, 1.0)


@dataclass
class _Canvas:
    """One image's pixel grid and its texture's period (px), edge gain and phase."""

    x: np.ndarray
    y: np.ndarray
    period: float
    gain: float  # edge sharpness, from soft sine to near-square wave
    phase: float

    def rotated(self, deg: float) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return self.x * c + self.y * s, self.y * c - self.x * s

    def wave(self, u: np.ndarray) -> np.ndarray:
        return np.clip(0.5 + self.gain * np.cos(2 * np.pi * u / self.period + self.phase), 0.0, 1.0)

    def cell_offset(self, u: np.ndarray) -> np.ndarray:  # signed distance to the cell centre, px
        return ((u / self.period + self.phase) % 1.0 - 0.5) * self.period


def _pattern(label: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Foreground mask in [0, 1] of shape (h, w) for the texture family ``label``."""
    short = min(h, w)
    period = max(4.0, short * rng.uniform(0.04, 0.15))
    gain = rng.uniform(1.5, 4.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    y, x = np.ogrid[:h, :w]
    canvas = _Canvas(x.astype(np.float32), y.astype(np.float32), period, gain, phase)
    jitter = rng.uniform(-8.0, 8.0)
    if label in (6, 9):
        return _random_pattern(label, canvas, rng, h, w)
    return _periodic_pattern(label, canvas, rng, jitter, short)


def _periodic_pattern(label: int, c: _Canvas, rng: np.random.Generator, jitter: float, short: int) -> np.ndarray:
    """Stripes, diagonals, checkers, dots, rings, grids and zigzags (the families but 6 and 9)."""
    if label == 0:
        return c.wave(c.rotated(90.0 + jitter)[0])
    if label == 1:
        return c.wave(c.rotated(jitter)[0])
    if label == 2:
        # Both diagonal directions belong to one class so a horizontal flip keeps the label.
        return c.wave(c.rotated(float(rng.choice([45.0, 135.0])) + jitter)[0])
    if label == 3:
        u, v = c.rotated(jitter)
        w_u, w_v = (np.cos(2 * np.pi * a / c.period + c.phase) for a in (u, v))
        return np.clip(0.5 + 2 * c.gain * w_u * w_v, 0.0, 1.0)
    if label == 4:
        u, v = c.rotated(rng.uniform(0.0, 90.0))
        radius = c.period * rng.uniform(0.2, 0.35)
        return np.clip(radius - np.hypot(c.cell_offset(u), c.cell_offset(v)) + 0.5, 0.0, 1.0)
    if label == 5:
        h, w = c.y.shape[0], c.x.shape[1]
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        return c.wave(np.hypot(c.x - cx, c.y - cy))
    if label == 7:
        u, v = c.rotated(jitter)
        half = max(1.0, c.period * rng.uniform(0.08, 0.2)) / 2
        edge = np.minimum(0.5 * c.period - np.abs(c.cell_offset(u)), 0.5 * c.period - np.abs(c.cell_offset(v)))
        return np.clip(half - edge + 0.5, 0.0, 1.0)
    # label 8: stripes displaced by a triangle wave; the zig wavelength stays below ~25% of the shorter side so even
    # a small crop contains a full zig and zag.
    c.period = min(c.period, max(4.0, 0.1 * short))
    u, v = c.rotated(float(rng.choice([0.0, 90.0])) + jitter)
    zig = c.period * rng.uniform(1.5, 2.5)
    tri = 2 * np.abs((v / zig) % 1.0 - 0.5) - 0.5
    return c.wave(u + zig * rng.uniform(0.4, 0.7) * tri)


def _random_pattern(label: int, c: _Canvas, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blobs (family 6) and speckle (family 9): random fields, not periodic ones."""
    if label == 6:
        cell = c.period * rng.uniform(1.0, 2.0)
        coarse = rng.random((int(h / cell) + 3, int(w / cell) + 3), dtype=np.float32)
        blobs = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC))
        blobs = (blobs - blobs.mean()) / (blobs.std() + 1e-6)
        return np.clip(0.5 + c.gain * blobs, 0.0, 1.0)
    # label 9: sparse random square specks; cells stay >= 3% of the short side so they are still visible after a
    # whole-image crop is shrunk to 64 px.
    cell = max(2.0, min(h, w) * rng.uniform(0.03, 0.05))
    specks = rng.random((int(h / cell) + 2, int(w / cell) + 2)) < rng.uniform(0.12, 0.25)
    oy, ox = rng.uniform(0.0, cell, size=2)
    return specks[((c.y + oy) / cell).astype(int), ((c.x + ox) / cell).astype(int)].astype(np.float32)


def _render(label: int, rng: np.random.Generator, min_size: int, max_size: int) -> np.ndarray:
    """One RGB uint8 image of class ``label``."""
    w = int(rng.integers(min_size, max_size + 1))
    # Clipping h into range only pulls the aspect ratio towards 1, so it stays in [0.5, 2].
    h = int(np.clip(round(w * np.exp(rng.uniform(np.log(0.5), np.log(2.0)))), min_size, max_size))
    # A loose per-class hue bias on one of the two colours: a hint, never the label by itself.
    hue_bias = 2 * np.pi * label / len(CLASS_NAMES) + rng.uniform(-0.8, 0.8)
    dark = _colour(rng, (0.08, 0.42), hue_bias)
    light = _colour(rng, (0.58, 0.95), rng.uniform(0.0, 2 * np.pi))
    bg, fg = (dark, light) if rng.random() < 0.5 else (light, dark)
    img = _pattern(label, rng, h, w)[..., None] * (fg - bg)
    img += bg

    # A small distractor shape, kept well under a minimum crop so it never hides the texture;
    # only its bounding box is rasterised.
    size = min(h, w) * rng.uniform(0.06, 0.15)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    y0, x0 = max(0, int(cy - size)), max(0, int(cx - size))
    y, x = np.ogrid[y0 : min(h, int(cy + size) + 1), x0 : min(w, int(cx + size) + 1)]
    if rng.random() < 0.5:
        inside = (y - cy) ** 2 + (x - cx) ** 2 < size**2
    else:
        inside = (np.abs(y - cy) < size * rng.uniform(0.5, 1.0)) & (np.abs(x - cx) < size)
    img[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]][inside] = _colour(
        rng, (0.05, 0.95), rng.uniform(0.0, 2 * np.pi)
    )

    noise = rng.standard_normal((h, w, 1), dtype=np.float32)
    noise *= rng.uniform(0.01, 0.03)
    img += noise
    img *= 255.0
    img += 0.5
    return np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)


def _is_complete(root: Path) -> bool:
    try:
        return json.loads((root / INFO_NAME).read_text())["generator_version"] >= 1
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_images(folder: Path, per_class: dict[str, int], min_size: int, max_size: int, grayscale_every: int,
                  seed: int, progress: Callable[[int, int], None] | None) -> None:
    """``folder/{train,val}/<class>/*.JPEG``: ``per_class[split]`` images of each class."""
    total = len(CLASS_NAMES) * sum(per_class.values())
    done = 0
    for split_id, split in enumerate(_SPLITS):
        for label, name in enumerate(CLASS_NAMES):
            (folder / split / name).mkdir(parents=True)
            for i in range(per_class[split]):
                # Per-image seeding makes every file independent of build order.
                rng = np.random.default_rng([seed, split_id, label, i])
                image = Image.fromarray(_render(label, rng, min_size, max_size))
                flat = label * per_class[split] + i + 1
                if grayscale_every > 0 and flat % grayscale_every == 0:
                    image = image.convert("L")
                image.save(folder / split / name / f"{name}_{i:05d}.JPEG", quality=JPEG_QUALITY)
                done += 1
                if progress is not None and (done % 100 == 0 or done == total):
                    progress(done, total)


def build_demo_dataset(
    root: Path,
    *,
    train_per_class: int = 260,
    val_per_class: int = 50,
    min_size: int = 64,
    max_size: int = 500,
    grayscale_every: int = 40,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``root/{train,val}/<class>/*.JPEG`` atomically; reuse ``root`` if already complete."""
    root = Path(root)
    if _is_complete(root):
        return root
    if not 4 <= min_size <= max_size:
        raise ValueError(f"need 4 <= min_size <= max_size, got {min_size}, {max_size}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but is not a complete demo dataset")

    per_class = {"train": train_per_class, "val": val_per_class}
    info = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "classes": list(CLASS_NAMES),
        "counts": {s: n * len(CLASS_NAMES) for s, n in per_class.items()},
        "per_class": per_class,
        "min_size": min_size,
        "max_size": max_size,
        "grayscale_every": grayscale_every,
    }
    try:
        with atomic_folder(root, overwrite=False) as tmp:
            _write_images(tmp, per_class, min_size, max_size, grayscale_every, seed, progress)
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")  # written last: marks completeness
    except OSError:
        if not _is_complete(root):  # otherwise a concurrent build won the race
            raise
    return root


def default_demo_root() -> Path:
    """``$VITBUDGET_CACHE``, else ``$XDG_CACHE_HOME/vitbudget``, else ``~/.cache/vitbudget``; plus ``demo-v1``."""
    cache = os.environ.get("VITBUDGET_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = str(Path(xdg) / "vitbudget") if xdg else str(Path.home() / ".cache" / "vitbudget")
    return Path(cache).expanduser() / "demo-v1"


def ensure_demo_dataset(root: Path | None = None, **kw) -> Path:
    """Return the demo dataset root, building it first if it is missing."""
    return build_demo_dataset(default_demo_root() if root is None else Path(root), **kw)
