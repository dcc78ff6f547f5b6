"""A timm VisionTransformer whose blocks are told the patch grid, for feed-forward networks that work on the grid."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer


class GridViT(VisionTransformer):
    """Runs at any input size that is a multiple of the patch size.

    The positional embedding is stored for one grid (``set_grid`` resizes it); an input of another size is served
    by resampling it on the fly (timm's ``dynamic_img_size``). Each block is called as ``block(x, grid)``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(dynamic_img_size=True, **kwargs)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, H, W, D): dynamic_img_size defers the flatten
        grid = (x.shape[1], x.shape[2])
        x = self._pos_embed(x)
        x = self.norm_pre(self.patch_drop(x))
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x)


def split_prefix(x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix tokens, patch tokens): whatever precedes the H*W patch tokens (the class token) is prefix."""
    n_prefix = x.shape[1] - grid[0] * grid[1]
    return x[:, :n_prefix], x[:, n_prefix:]


def tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) row-major tokens -> (B, C, H, W), a channels-last view (no copy)."""
    b, n, _ = x.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    return x.view(b, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); free when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def default_cfgs_for(*names: str) -> Any:
    """timm's data config of each model (no weights to download): what ``resolve_data_config`` reads for a model
    built by name, and what a run's exported folder overrides with the run's own size and interpolation."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import generate_default_cfgs

    cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
           "interpolation": "bilinear", "crop_pct": 0.875, "num_classes": 1000, "fixed_input_size": False,
           "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}
    return generate_default_cfgs({name: dict(cfg) for name in names})


def create(cls: type[GridViT], variant: str, pretrained: bool, defaults: dict[str, Any],
           kwargs: dict[str, Any]) -> GridViT:
    """What a timm registration function does for these models: defaults, overridden by the caller's kwargs, built
    by timm's builder, so that a folder exported from a run (``timm.create_model("local-dir:RUN/model",
    pretrained=True)``) loads its weights and its data config (a position embedding saved for another grid than
    the one asked for is resampled by timm's ViT checkpoint filter)."""
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import checkpoint_filter_fn

    cfg = kwargs.get("pretrained_cfg")
    local = isinstance(cfg, dict) and cfg.get("file") or getattr(cfg, "file", None)
    if pretrained and not local:
        raise ValueError(f"{variant} has no pretrained weights: it is trained from scratch by vit-train (load a "
                         f"run's exported folder with timm.create_model('local-dir:RUN/model', pretrained=True))")
    kwargs.pop("cache_dir", None)
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**defaults, **kwargs})
