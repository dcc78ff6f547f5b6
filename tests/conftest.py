"""Shared fixtures: tiny generated ImageNet-layout folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels (the fused locality FFN's) run in Triton's interpreter, on CPU tensors. Triton fixes
# the mode when it is first imported (timm imports it, through torch._dynamo), so it is chosen here, before any test
# module is imported; on a CUDA machine the kernels compile and run on the GPU as in training.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

# One dominant colour per class: after decode, crop and normalize, the brightest channel names the label.
CLASS_COLOURS = {"a_red": (200, 30, 30), "b_green": (30, 200, 30), "c_blue": (30, 30, 200)}


def make_colour_dataset(root: Path, train_per_class: int = 8, val_per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(40, 120, size=2)
                noise = rng.normal(0, 20, size=(h, w, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))
