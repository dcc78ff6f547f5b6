"""Build any of the product's models by name, and move a built model to another image size."""

from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

import model.locality_vit  # noqa: F401  (registers the models with timm)
import model.localvit  # noqa: F401

LOCALITY_MODELS = ("vit_local_small_patch16", "vit_local_tiny_patch16", "vit_local_test_patch16")
BASELINES = ("deit_small_patch16_224", "localvit_small_patch16")
MODELS: tuple[str, ...] = LOCALITY_MODELS + BASELINES
BASE_IMAGE_SIZE = 224  # every model is created for the 14x14 grid, then moved to the size in use


def build_model(name: str, *, num_classes: int, image_size: int = BASE_IMAGE_SIZE, act: str = "hswish",
                drop_path: float | None = None) -> nn.Module:
    """Create ``name`` through timm and move its position embedding to the grid of ``image_size``.

    ``act`` (the FFN activation ablation) applies to the locality models only.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    kwargs: dict = {"num_classes": num_classes, "img_size": BASE_IMAGE_SIZE}
    if name in LOCALITY_MODELS:
        kwargs["act"] = act
    elif act != "hswish":
        raise ValueError(f"act={act!r} applies to the locality models ({', '.join(LOCALITY_MODELS)}), not {name}")
    if name == "deit_small_patch16_224":
        kwargs["dynamic_img_size"] = True  # serve any multiple of 16, as ours do
        kwargs["drop_path_rate"] = 0.1  # DeiT's recipe (timm's default is 0)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    net = timm.create_model(name, **kwargs)
    set_grid(net, image_size)
    return net


@torch.no_grad()
def set_grid(net: nn.Module, image_size: int) -> tuple[int, int]:
    """Resize the stored position embedding, by bicubic interpolation, to the patch grid of ``image_size``.

    The ``pos_embed`` Parameter object is kept (its data replaced), so an optimizer that holds it keeps holding
    it; only the optimizer's state for it (e.g. Adam's moments) has the old shape, which the caller must resize
    or reset. Returns the old grid.
    """
    old_grid = tuple(net.patch_embed.grid_size)
    net.patch_embed.set_input_size(img_size=(image_size, image_size))
    new_grid = tuple(net.patch_embed.grid_size)
    if new_grid != old_grid:
        prefix = 0 if net.no_embed_class else net.num_prefix_tokens
        net.pos_embed.data = resample_abs_pos_embed(net.pos_embed.data, new_size=new_grid, old_size=old_grid,
                                                    num_prefix_tokens=prefix)
    return old_grid

