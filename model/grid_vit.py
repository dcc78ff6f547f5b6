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


def create(cls: type[GridViT], variant: str, pretrained: bool, defaults: dict[str, Any],
           kwargs: dict[str, Any]) -> GridViT:
    """What a timm registration function does for these models: defaults, overridden by the caller's kwargs."""
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights: it is trained from scratch by vit-train")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return cls(**{**defaults, **kwargs})
