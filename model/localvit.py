"""The LocalViT-S baseline (Li et al., 2021): a DeiT-S whose FFN is a BatchNorm conv stack with squeeze-excitation."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import Attention, DropPath, LayerNorm, SEModule
from timm.models import register_model
from torch import nn

from model.grid_vit import GridViT, create, default_cfgs_for, grid_to_tokens, split_prefix, tokens_to_grid

__all__ = ["LocalViTFeedForward", "LocalViTBlock", "LocalViT"]


class LocalViTFeedForward(nn.Module):
    """1x1 conv -> BN -> h-swish -> 3x3 depth-wise conv -> BN -> h-swish -> SE -> 1x1 conv -> BN, on the patch grid.

    As LocalViT's code defines it: convolutions without bias, an SE module with ReLU and a hard-sigmoid gate whose
    reduction is D (its "r384" for LocalViT-S, "r192" for the tiny one), so its hidden width is 4D/D = 4.
    """

    def __init__(self, dim: int, hidden_dim: int, se_reduction: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.act1 = nn.Hardswish()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.act2 = nn.Hardswish()
        self.se = SEModule(hidden_dim, rd_channels=max(1, hidden_dim // (se_reduction or dim)), act_layer=nn.ReLU,
                           gate_layer="hard_sigmoid")
        self.conv2 = nn.Conv2d(hidden_dim, dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = tokens_to_grid(x, grid)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.dwconv(x)))
        x = self.bn3(self.conv2(self.se(x)))
        return grid_to_tokens(x)


class LocalViTBlock(nn.Module):
    """Pre-norm attention; then the FFN on the patch tokens with no LayerNorm before it, the class token bypassing it.

    LocalViT's code applies drop-path to the attention branch only; so does this block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = LayerNorm, **_: Any) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = LocalViTFeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        prefix, patches = split_prefix(x, grid)
        return torch.cat([prefix, patches + self.mlp(patches, grid)], dim=1)


class LocalViT(GridViT):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("norm_layer", partial(LayerNorm, eps=1e-6))
        super().__init__(block_fn=LocalViTBlock, **kwargs)


default_cfgs = default_cfgs_for("localvit_small_patch16", "localvit_tiny_patch16")  # read by register_model


@register_model
def localvit_small_patch16(pretrained: bool = False, **kwargs: Any) -> LocalViT:
    """LocalViT-S: dim 384, depth 12, 8 heads, qkv bias, SE reduction 384 (published: 22.4 M parameters)."""
    defaults = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 8, "mlp_ratio": 4.0,
                "qkv_bias": True, "drop_path_rate": 0.1}
    return create(LocalViT, "localvit_small_patch16", pretrained, defaults, kwargs)


@register_model
def localvit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> LocalViT:
    """LocalViT-S's construction at DeiT-Ti size (dim 192, depth 12, 3 heads): the CPU-sized baseline."""
    defaults = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0,
                "qkv_bias": True, "drop_path_rate": 0.1}
    return create(LocalViT, "localvit_tiny_patch16", pretrained, defaults, kwargs)
