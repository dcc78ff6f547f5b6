"""Position-embedding resizing at a stage change, and the optimizer state that goes with it."""

from __future__ import annotations

import math

import torch
from torch import nn

from model import build_model, set_grid
from trainer.resize import resize_for_stage


def _net(size: int = 224):
    return build_model("vit_local_test_patch16", num_classes=3, image_size=size)


def test_same_size_is_the_identity():
    """set_grid to the current size leaves the position embedding bit for bit."""
    net = _net(64)
    before = net.pos_embed.detach().clone()
    set_grid(net, 64)
    assert torch.equal(net.pos_embed, before)


def test_a_constant_embedding_stays_constant():
    """A constant embedding stays that constant, resized down and up."""
    net = _net(224)
    with torch.no_grad():
        net.pos_embed.fill_(0.25)
    set_grid(net, 96)
    torch.testing.assert_close(net.pos_embed, torch.full_like(net.pos_embed, 0.25))
    set_grid(net, 320)
    torch.testing.assert_close(net.pos_embed, torch.full_like(net.pos_embed, 0.25))


def test_up_then_down_approximately_returns_a_smooth_embedding():
    """A smooth 7x7 embedding resized to 14x14 and back is within 5% (mean relative error); the class position
    is carried exactly."""
    net = _net(112)  # 7x7 grid
    y, x = torch.meshgrid(torch.linspace(0, 1, 7), torch.linspace(0, 1, 7), indexing="ij")
    g = torch.Generator().manual_seed(0)
    freq = torch.rand(net.embed_dim, 2, generator=g)  # at most half a period across the grid: smooth
    field = torch.sin(math.pi * (x[..., None] * freq[:, 0] + y[..., None] * freq[:, 1]))
    with torch.no_grad():
        net.pos_embed[:, 1:] = field.reshape(1, 49, -1)
    original = net.pos_embed.detach().clone()
    set_grid(net, 224)
    set_grid(net, 112)
    torch.testing.assert_close(net.pos_embed[:, :1], original[:, :1])  # class position carried exactly
    error = (net.pos_embed - original).abs().mean() / original.abs().mean()
    assert error < 0.05


def test_optimizer_keeps_stepping_across_resizes_with_consistent_state():
    """Across 32-64-96-64-224 px, AdamW's moments follow the embedding's shape, stay valid, and it keeps training."""
    torch.manual_seed(0)
    net = _net(32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for size in (32, 64, 96, 64, 224):
        resize_for_stage(net, opt, size)
        grid = size // 16
        x = torch.randn(2, 3, size, size)
        before = net.pos_embed.detach().clone()
        loss = nn.functional.cross_entropy(net(x), torch.tensor([0, 2]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state = opt.state[net.pos_embed]
        assert net.pos_embed.shape == state["exp_avg"].shape == state["exp_avg_sq"].shape == (1, 1 + grid**2, 96)
        assert (state["exp_avg_sq"] >= 0).all()
        assert torch.isfinite(net.pos_embed).all()
        assert not torch.equal(net.pos_embed, before)  # still trained after the resize


def test_resize_keeps_a_constant_optimizer_state_constant():
    """A resize moves AdamW's state to the new parameter (the old one dropped) and keeps constant moments constant."""
    net = _net(64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(1, 3, 64, 64)).sum().backward()
    opt.step()
    state = opt.state[net.pos_embed]
    state["exp_avg"].fill_(-0.5)
    state["exp_avg_sq"].fill_(2.0)
    old = net.pos_embed
    resize_for_stage(net, opt, 128)
    assert opt.state[net.pos_embed] is state and old not in opt.state
    assert any(p is net.pos_embed for group in opt.param_groups for p in group["params"])
    assert not any(p is old for group in opt.param_groups for p in group["params"])
    assert state["exp_avg"].shape == (1, 1 + 64, 96)
    assert torch.allclose(state["exp_avg"], torch.tensor(-0.5))
    assert torch.allclose(state["exp_avg_sq"], torch.tensor(2.0))
