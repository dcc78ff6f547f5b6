"""Build any of the product's models by name, and move a built model to another image size."""

from __future__ import annotations

import timm
from torch import nn

import model.locality_vit  # noqa: F401  (registers the models with timm)
import model.localvit  # noqa: F401

LOCALITY_MODELS = ("vit_local_small_patch16", "vit_local_tiny_patch16", "vit_local_test_patch16")
BASELINES = ("deit_small_patch16_224", "localvit_small_patch16", "deit_tiny_patch16_224", "localvit_tiny_patch16")
MODELS: tuple[str, ...] = LOCALITY_MODELS + BASELINES
BASE_IMAGE_SIZE = 224  # every model is created for the 14x14 grid, then moved to the size in use


def build_model(name: str, *, num_classes: int, image_size: int = BASE_IMAGE_SIZE, act: str = "hswish",
                drop_path: float | None = None, fused_ffn: bool = False) -> nn.Module:
    """Create ``name`` through timm and move its position embedding to the grid of ``image_size``.

    ``act`` (the FFN activation ablation) and ``fused_ffn`` (the FFN's middle as one Triton kernel, h-swish only)
    apply to the locality models only.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    kwargs: dict = {"num_classes": num_classes, "img_size": BASE_IMAGE_SIZE}
    if name in LOCALITY_MODELS:
        kwargs["act"] = act
    elif act != "hswish":
        raise ValueError(f"act={act!r} applies to the locality models ({', '.join(LOCALITY_MODELS)}), not {name}")
    if name.startswith("deit_"):
        kwargs["dynamic_img_size"] = True  # serve any multiple of 16, as ours do
        kwargs["drop_path_rate"] = 0.1  # DeiT's recipe (timm's default is 0)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    net = timm.create_model(name, **kwargs)
    if fused_ffn:
        if name not in LOCALITY_MODELS:
            raise ValueError(f"fused_ffn applies to the locality models ({', '.join(LOCALITY_MODELS)}), not {name}")
        model.locality_vit.set_fused(net, True)
    set_grid(net, image_size)
    return net


def set_grid(net: nn.Module, image_size: int) -> tuple[int, int]:
    """Resize the stored position embedding, by bicubic interpolation, to the patch grid of ``image_size``.

    When the grid changes, ``net.pos_embed`` becomes a new Parameter (timm's ``set_input_size``). It cannot be
    resized in place: once a backward pass has run, autograd's gradient accumulator for the old Parameter keeps
    its old shape and rejects the new gradient. An optimizer holding the old Parameter must be pointed at the new
    one (``trainer.resize.resize_for_stage`` does, with its state). Returns the old grid.
    """
    old_grid = tuple(net.patch_embed.grid_size)
    if old_grid != (image_size // net.patch_embed.patch_size[0], image_size // net.patch_embed.patch_size[1]):
        net.set_input_size(img_size=(image_size, image_size))
    return old_grid

