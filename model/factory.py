"""Build a model by name at an image size, and move a built model to another image size."""

from __future__ import annotations

import timm
from torch import nn

import model.locality_vit  # noqa: F401  (registers the models with timm)

MODELS: tuple[str, ...] = ("vit_local_small_patch16", "vit_local_tiny_patch16", "vit_local_test_patch16")


def build_model(name: str, *, num_classes: int, image_size: int, act: str = "hswish",
                drop_path: float | None = None) -> nn.Module:
    """Create ``name`` through timm with its positional embedding laid out for ``image_size``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    kwargs = dict(num_classes=num_classes, img_size=image_size, act=act)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    return timm.create_model(name, **kwargs)


def set_image_size(net: nn.Module, image_size: int) -> None:
    """Resample the positional embedding (by interpolation) to the patch grid of ``image_size``.

    Replaces the ``pos_embed`` parameter: optimizer state that refers to it must be rebuilt by the caller.
    """
    net.set_input_size(img_size=(image_size, image_size))
