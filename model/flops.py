"""Count a model's forward FLOPs for one image at a given size (a multiply-add counts as 2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_flops(net: nn.Module, image_size: int) -> int:
    """Runs one forward pass of a single image on the model's device under torch's FLOP counter.

    Fused attention kernels are invisible to the counter on some backends, so attention runs as explicit matmuls
    while counting (the same maths). Training costs about 3x this (the backward pass is about twice the forward).
    """
    param = next(net.parameters())
    fused = [m for m in net.modules() if getattr(m, "fused_attn", False)]
    was_training = net.training
    for m in fused:
        m.fused_attn = False
    net.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            net(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for m in fused:
            m.fused_attn = True
        net.train(was_training)
    return int(counter.get_total_flops())


def train_flops(net: nn.Module, image_size: int) -> float:
    """A training step's FLOPs for one image: the forward's, about 3 times (the backward is about twice the forward)."""
    return 3.0 * forward_flops(net, image_size)
