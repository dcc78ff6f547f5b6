"""Move a model and its optimizer to a new image size at a stage change, keeping the position embedding trainable."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from model import set_grid

# Adam's first moment is resampled like the embedding itself; the second moment must stay non-negative, which
# bicubic interpolation does not guarantee (its kernel has negative lobes) and bilinear does.
_STATE_INTERPOLATION = {"exp_avg": "bicubic", "exp_avg_sq": "bilinear", "max_exp_avg_sq": "bilinear"}


@torch.no_grad()
def resize_for_stage(net: nn.Module, optimizer: torch.optim.Optimizer, image_size: int) -> tuple[int, int]:
    """Resize the position embedding to ``image_size``'s grid, and hand the optimizer the new Parameter with its
    state resized alike. Returns the old grid.

    Why resize the state rather than reset it: resetting Adam's moments while keeping its step count makes the
    first updates several times larger than usual (the bias correction assumes full moments), and resetting the
    step too throws away a well-estimated per-position scale; resampling keeps both consistent with the resampled
    embedding. (The authors' released code left the optimizer on the old Parameter, so their curriculum runs
    never trained the position embedding again after the first size change.)
    """
    old_param = net.pos_embed
    old_grid = set_grid(net, image_size)
    new_param = net.pos_embed
    if new_param is old_param:
        return old_grid
    for group in optimizer.param_groups:
        group["params"] = [new_param if p is old_param else p for p in group["params"]]
    state = optimizer.state.pop(old_param, None)
    if state:
        prefix = 0 if net.no_embed_class else net.num_prefix_tokens
        for key, mode in _STATE_INTERPOLATION.items():
            if key in state:
                resized = resample_abs_pos_embed(state[key], new_size=tuple(net.patch_embed.grid_size),
                                                 old_size=old_grid, num_prefix_tokens=prefix, interpolation=mode)
                state[key] = resized if key == "exp_avg" else resized.clamp_min_(0)
        optimizer.state[new_param] = state
    return old_grid
