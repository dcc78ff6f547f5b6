"""The paper's locality ViT: a DeiT-style ViT whose feed-forward networks run a depth-wise conv on the patch grid."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import Attention, DropPath, LayerNorm, LayerScale
from timm.models import register_model
from torch import nn

from model.fused_ffn import locality_dwconv
from model.grid_vit import GridViT, create, default_cfgs_for, grid_to_tokens, split_prefix, tokens_to_grid

__all__ = ["LocalityFeedForward", "LocalityBlock", "LocalityViT", "ACTIVATIONS", "set_fused"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"hswish": nn.Hardswish, "gelu": nn.GELU}


class LocalityFeedForward(nn.Module):
    """Linear(D->4D) -> act -> Seq2Im -> 3x3 depth-wise conv -> act -> Im2Seq -> Linear(4D->D).

    Takes patch tokens only (B, H*W, D) in row-major grid order, which is the order timm's
    PatchEmbed flattens them in. The released code has no bias in fc1, the conv or fc2.

    ``fused`` (h-swish only; set by ``set_fused``): the middle runs as one Triton kernel (``model.fused_ffn``) and the
    FFN takes the whole sequence (B, P + H*W, D), returning zeros on the P prefix rows (no bias anywhere: the class
    token gets nothing added, as when it skips the FFN). The weights are the same either way.
    """

    fused = False

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False)
        self.act1 = act_layer()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, bias=False)
        self.act2 = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.fused:
            return self.fc2(locality_dwconv(self.fc1(x).contiguous(), self.dwconv.weight, *grid))
        x = tokens_to_grid(self.act1(self.fc1(x)), grid)  # channels-last: the layout cuDNN's depth-wise kernels like
        x = grid_to_tokens(self.act2(self.dwconv(x)))
        return self.fc2(x)


class LocalityBlock(nn.Module):
    """Pre-norm transformer block; the prefix (class) tokens skip the feed-forward network entirely."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.Hardswish,
        norm_layer: type[nn.Module] = LayerNorm,
        **_: Any,  # the rest of timm's Block arguments (mlp_layer, qk_norm, ...) do not apply here
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = LocalityFeedForward(dim, int(dim * mlp_ratio), act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.mlp.fused:  # the fused FFN adds zeros to the class token: no split, no concatenation
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), grid)))
        prefix, patches = split_prefix(x, grid)
        patches = patches + self.drop_path2(self.ls2(self.mlp(self.norm2(patches), grid)))
        return torch.cat([prefix, patches], dim=1)


def set_fused(net: nn.Module, on: bool) -> None:
    """Run every locality FFN of ``net`` fused (``on``) or as PyTorch ops. Fused needs the h-swish activation (the
    kernel's)."""
    ffns = [m for m in net.modules() if isinstance(m, LocalityFeedForward)]
    if on and any(not isinstance(m.act1, nn.Hardswish) for m in ffns):
        raise ValueError("the fused locality FFN computes h-swish; this model's FFN uses another activation")
    for m in ffns:
        m.fused = on


class LocalityViT(GridViT):
    """timm's VisionTransformer with locality blocks (``act``: "hswish", the paper's, or "gelu", the ablation)."""

    def __init__(self, act: str = "hswish", **kwargs: Any) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")
        kwargs.setdefault("norm_layer", partial(LayerNorm, eps=1e-6))
        super().__init__(block_fn=LocalityBlock, act_layer=ACTIVATIONS[act], **kwargs)


_SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "test": dict(embed_dim=96, depth=4, num_heads=2, drop_path_rate=0.0),
}


def _locality(size: str, pretrained: bool, kwargs: dict[str, Any]) -> LocalityViT:
    defaults = {"patch_size": 16, "mlp_ratio": 4.0, "drop_path_rate": 0.1, **_SIZES[size]}
    return create(LocalityViT, f"vit_local_{size}_patch16", pretrained, defaults, kwargs)


default_cfgs = default_cfgs_for(  # read by register_model
    "vit_local_small_patch16", "vit_local_tiny_patch16", "vit_local_test_patch16")


@register_model
def vit_local_small_patch16(pretrained: bool = False, **kwargs: Any) -> LocalityViT:
    """The paper's model: DeiT-S size (dim 384, depth 12, 6 heads) with locality feed-forward networks."""
    return _locality("small", pretrained, kwargs)


@register_model
def vit_local_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> LocalityViT:
    """DeiT-Ti size (dim 192, depth 12, 3 heads): the CPU-sized variant."""
    return _locality("tiny", pretrained, kwargs)


@register_model
def vit_local_test_patch16(pretrained: bool = False, **kwargs: Any) -> LocalityViT:
    """A few-block model for tests and quick CPU runs (dim 96, depth 4, 2 heads)."""
    return _locality("test", pretrained, kwargs)
