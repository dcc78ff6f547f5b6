"""The locality ViT: the FFN's grid mapping, the class-token bypass, any-size inputs, timm registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from model import MODELS, LocalityBlock, LocalityFeedForward, LocalViTBlock, build_model, set_grid


def _identity_ffn(channels: int) -> LocalityFeedForward:
    ffn = LocalityFeedForward(channels, channels)
    ffn.act1 = ffn.act2 = nn.Identity()
    with torch.no_grad():
        ffn.fc1.weight.copy_(torch.eye(channels))
        ffn.fc2.weight.copy_(torch.eye(channels))
    return ffn


def test_depthwise_shift_moves_each_token_to_its_grid_neighbour():
    h, w, c = 3, 5, 4  # not square: a transposed reshape would fail
    ffn = _identity_ffn(c)
    with torch.no_grad():
        ffn.dwconv.weight.zero_()
        ffn.dwconv.weight[:, 0, 1, 0] = 1.0  # out(y, x) = in(y, x - 1): a shift one pixel to the right
    tokens = torch.randn(2, h * w, c)
    out = ffn(tokens, (h, w))
    grid_in, grid_out = tokens.view(2, h, w, c), out.view(2, h, w, c)
    torch.testing.assert_close(grid_out[:, :, 1:], grid_in[:, :, :-1])
    assert torch.all(grid_out[:, :, 0] == 0)  # left column: zero padding, not the previous row's end


def test_vertical_shift_moves_tokens_down_one_row():
    h, w, c = 4, 3, 2
    ffn = _identity_ffn(c)
    with torch.no_grad():
        ffn.dwconv.weight.zero_()
        ffn.dwconv.weight[:, 0, 0, 1] = 1.0  # out(y, x) = in(y - 1, x)
    tokens = torch.randn(1, h * w, c)
    out = ffn(tokens, (h, w)).view(1, h, w, c)
    torch.testing.assert_close(out[:, 1:], tokens.view(1, h, w, c)[:, :-1])


def test_ffn_rejects_tokens_that_do_not_fill_the_grid():
    with pytest.raises(ValueError, match="grid"):
        LocalityFeedForward(4, 8)(torch.randn(1, 7, 4), (2, 4))


def test_class_token_bypasses_the_feed_forward_network():
    torch.manual_seed(0)
    block = LocalityBlock(dim=16, num_heads=2).eval()
    seen = []
    block.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x = torch.randn(2, 1 + 3 * 4, 16)
    before = block(x, (3, 4))
    assert seen == [torch.Size([2, 12, 16])]  # the FFN saw the 12 patch tokens only
    with torch.no_grad():
        block.mlp.dwconv.weight.mul_(-3.0)
        block.mlp.fc2.weight.add_(1.0)
    after = block(x, (3, 4))
    torch.testing.assert_close(after[:, 0], before[:, 0])  # class token untouched by the FFN
    assert not torch.allclose(after[:, 1:], before[:, 1:])


@pytest.mark.parametrize("size", [32, 64, 224])
def test_model_runs_at_any_multiple_of_the_patch_size(size):
    net = build_model("vit_local_test_patch16", num_classes=7, image_size=64)
    logits = net(torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_set_grid_interpolates_the_position_embedding():
    net = build_model("vit_local_test_patch16", num_classes=3, image_size=32)
    assert net.pos_embed.shape[1] == 1 + 2 * 2
    old_cls = net.pos_embed[:, :1].detach().clone()
    assert set_grid(net, 96) == (2, 2)
    assert net.pos_embed.requires_grad
    assert net.pos_embed.shape[1] == 1 + 6 * 6
    torch.testing.assert_close(net.pos_embed[:, :1], old_cls)  # class position is carried, not resampled
    assert net(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_models_are_registered_with_timm():
    """timm lists the locality and LocalViT models, and builds the tiny one with its width, depth and heads."""
    for name in ("vit_local_small_patch16", "vit_local_tiny_patch16", "localvit_small_patch16"):
        assert name in timm.list_models()
    net = timm.create_model("vit_local_tiny_patch16", num_classes=10, img_size=64)
    assert net.embed_dim == 192 and len(net.blocks) == 12 and net.blocks[0].attn.num_heads == 3


def test_small_is_deit_small_plus_depthwise_convs_minus_ffn_biases():
    ours = timm.create_model("vit_local_small_patch16")
    deit = timm.create_model("deit_small_patch16_224")
    d, hidden, depth = 384, 4 * 384, 12
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (ours.embed_dim, len(ours.blocks), ours.blocks[0].attn.num_heads) == (d, depth, 6)
    assert count(ours) == count(deit) + depth * (hidden * 9 - hidden - d)


def test_gelu_ablation_swaps_both_activations():
    """act=gelu puts GELU at both FFN activations; the default is Hardswish."""
    net = build_model("vit_local_test_patch16", num_classes=3, image_size=32, act="gelu")
    ffn = net.blocks[0].mlp
    assert isinstance(ffn.act1, nn.GELU) and isinstance(ffn.act2, nn.GELU)
    assert isinstance(build_model("vit_local_test_patch16", num_classes=3, image_size=32).blocks[0].mlp.act1,
                      nn.Hardswish)


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_deit_small_is_timms_deit_small_exactly():
    ours = build_model("deit_small_patch16_224", num_classes=1000)
    assert _count(ours) == _count(timm.create_model("deit_small_patch16_224"))
    assert ours(torch.randn(1, 3, 64, 64)).shape == (1, 1000)  # any multiple of 16, like ours


def test_localvit_small_matches_its_published_size():
    """LocalViT-S: 22.4M parameters (within 1%), 8 heads, no LayerNorm before its FFN, its SE and 3 BatchNorms."""
    net = build_model("localvit_small_patch16", num_classes=1000)
    assert abs(_count(net) - 22.4e6) / 22.4e6 < 0.01
    assert net.blocks[0].attn.num_heads == 8 and net.embed_dim == 384 and len(net.blocks) == 12
    assert not hasattr(net.blocks[0], "norm2")  # no LayerNorm before LocalViT's FFN
    se = net.blocks[0].mlp.se
    assert se.fc1.out_channels == 4 * 384 // 384 and isinstance(se.act, nn.ReLU) and isinstance(se.gate, nn.Hardsigmoid)
    bns = [m for m in net.blocks[0].mlp.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3


def test_localvit_batchnorm_uses_batch_statistics_in_train_and_running_ones_in_eval():
    torch.manual_seed(0)
    block = LocalViTBlock(dim=16, num_heads=2)
    x = torch.randn(4, 1 + 9, 16)
    bn = block.mlp.bn1
    before = bn.running_mean.clone()
    block.train()
    full, first = block(x, (3, 3)), block(x[:1], (3, 3))
    assert not torch.allclose(full[:1, 1:], first[:, 1:], atol=1e-5)  # depends on the rest of the batch
    assert not torch.equal(bn.running_mean, before)  # running statistics moved
    block.eval()
    torch.testing.assert_close(block(x, (3, 3))[:1], block(x[:1], (3, 3)))  # per-sample in eval
    torch.testing.assert_close(full[:, 0], block.train()(x, (3, 3))[:, 0])  # class token never enters the FFN


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [32, 224])
def test_every_model_trains_one_step_and_its_position_embedding_learns(name, size):
    torch.manual_seed(0)
    net = build_model(name, num_classes=10, image_size=size)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = net.pos_embed.detach().clone()
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(net(x), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert net.pos_embed.grad is not None and net.pos_embed.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(net.pos_embed, before)


def test_gelu_ablation_has_no_hardswish_anywhere():
    net = build_model("vit_local_small_patch16", num_classes=10, act="gelu")
    kinds = {type(m) for m in net.modules()}
    assert nn.Hardswish not in kinds and nn.GELU in kinds
    assert nn.Hardswish in {type(m) for m in build_model("vit_local_small_patch16", num_classes=10).modules()}


def test_act_ablation_is_refused_for_baselines():
    with pytest.raises(ValueError, match="locality models"):
        build_model("deit_small_patch16_224", num_classes=10, act="gelu")


def test_the_docs_model_table_is_the_tools_output():
    from tools.model_table import model_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert model_table() in page


def test_flop_count_matches_a_hand_count():
    from model.flops import forward_flops

    net = build_model("vit_local_test_patch16", num_classes=10, image_size=32)
    d, hidden, heads, depth, patches = 96, 384, 2, 4, 4  # 32 px: a 2x2 grid
    tokens = patches + 1
    embed = 2 * patches * d * 3 * 16 * 16
    per_block = (2 * tokens * d * 3 * d  # qkv
                 + 2 * 2 * heads * tokens * tokens * (d // heads)  # q @ k^T and attn @ v
                 + 2 * tokens * d * d  # proj
                 + 2 * patches * d * hidden * 2  # fc1 and fc2: patch tokens only (the class token skips the FFN)
                 + 2 * patches * hidden * 9)  # 3x3 depth-wise conv
    head = 2 * d * 10
    assert forward_flops(net, 32) == embed + depth * per_block + head
