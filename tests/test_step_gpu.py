"""The captured training step (trainer/step.py, ``--step graph``) on a CUDA device: it trains as the eager step does,
recaptures at a stage change, and keeps its randomness (drop-path masks, batch augmentation) fresh at every replay.

Skipped where there is no CUDA device (or no bf16 on it). Replays overwrite one static loss tensor, so every loss
is read (``.item()``) right after its step.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from timm.layers import DropPath

from trainer.config import parse_args
from trainer.resize import resize_for_stage
from trainer.step import TrainStep, resolve_step_mode

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
    reason="CUDA-graph training steps need a CUDA device with bf16",
)

NUM_CLASSES = 10
BATCH = 8
LR = 1e-3  # set on every step: large enough that five AdamW steps visibly move the weights


def make_step(mode: str, *flags: str, size: int = 32, amp: str = "bf16") -> TrainStep:
    """The trainer's factory, from the same seed every time (same initial weights)."""
    cfg = parse_args(["--data", "x", "--model", "vit_local_test_patch16", "--image-size", str(size), "--no-curriculum",
                      "--batch-size", str(BATCH), "--device", "cuda", "--amp", amp, "--step", mode, *flags])
    torch.manual_seed(0)
    return TrainStep.for_config(cfg, NUM_CLASSES, torch.device("cuda"), image_size=size, mode=mode)


def batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch as the GPU pipeline hands it over: float16, NHWC memory (a channels-last NCHW view)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, size, size, 3, generator=g).to("cuda", torch.float16).permute(0, 3, 1, 2)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g).to("cuda")
    return images, labels


def settle(step: TrainStep, size: int, seed: int = 0) -> None:
    """Warm-up steps and the capture (itself a trained step) on fresh batches."""
    for i in range(step.settle_steps):
        assert not step.captured
        loss = step(*batch(size, seed + i), lr=LR)
        assert math.isfinite(loss.item())
    assert step.captured and not step.settling


def weights(step: TrainStep) -> list[torch.Tensor]:
    return [p.detach().clone() for p in step.net.parameters()]


def test_graph_step_trains_as_the_eager_step_does():
    eager = make_step("eager", "--drop-path", "0")
    graph = make_step("graph", "--drop-path", "0")
    graph.net.load_state_dict(eager.net.state_dict())  # same weights whatever the seeding
    start = weights(eager)
    batches = [batch(32, seed) for seed in range(5)]
    assert graph.settle_steps < len(batches)  # warm-up, capture, and at least one replay
    eager_losses, graph_losses = [], []
    for images, labels in batches:
        eager_losses.append(eager(images.clone(), labels, lr=LR).item())
        graph_losses.append(graph(images.clone(), labels, lr=LR).item())
    assert graph.captured and not eager.captured
    assert all(math.isfinite(v) for v in graph_losses)
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=2e-2, atol=2e-2)
    # The same five updates, compared as a whole: Adam's first steps move each weight by about lr * sign(grad), so
    # rounding noise flips the few near-zero gradients' updates outright. A missed, doubled or wrongly scaled
    # update (the lr tensor not set, say) leaves a relative difference near 1 or above.
    eager_moved = torch.cat([(w - w0).flatten() for w, w0 in zip(weights(eager), start, strict=True)])
    graph_moved = torch.cat([(w - w0).flatten() for w, w0 in zip(weights(graph), start, strict=True)])
    assert eager_moved.norm() > 0
    assert (graph_moved - eager_moved).norm() / eager_moved.norm() < 0.25
    # and no single weight further off than two opposite five-step Adam paths (|update| <= ~lr per step) could be
    for w_graph, w_eager in zip(weights(graph), weights(eager), strict=True):
        torch.testing.assert_close(w_graph, w_eager, rtol=0, atol=12 * LR)
    assert not graph.diverged() and not eager.diverged()


def test_stage_change_recaptures_and_trains_the_new_position_embedding():
    step = make_step("graph", "--drop-path", "0")
    settle(step, 32)
    old_pos = step.net.pos_embed

    step.prepare()  # the trainer's order: drop the graph, then resize
    assert not step.captured and step.settling
    resize_for_stage(step.net, step.optimizer, 48)
    pos = step.net.pos_embed
    assert pos is not old_pos and pos.shape != old_pos.shape
    assert any(p is pos for group in step.optimizer.param_groups for p in group["params"])

    settle(step, 48, seed=100)  # warm-up and capture again, at the new shape
    assert pos.grad is not None and pos.grad.shape == pos.shape
    pos_captured = pos.detach().clone()
    for i in range(3):
        before = weights(step)
        loss = step(*batch(48, 200 + i), lr=LR)
        assert math.isfinite(loss.item())
        assert any(not torch.equal(a, b) for a, b in zip(before, weights(step), strict=True)), f"replay {i}"
    assert step.net.pos_embed is pos
    assert not torch.equal(pos.detach(), pos_captured), "the optimizer no longer updates the position embedding"
    assert not step.diverged()


def two_losses_at_lr_zero(step: TrainStep) -> tuple[float, float]:
    """Two replays on the same batch that leave the weights as they were (lr 0, no weight decay)."""
    settle(step, 32)
    images, labels = batch(32, 99)
    before = weights(step)
    first = step(images.clone(), labels, lr=0.0).item()
    second = step(images.clone(), labels, lr=0.0).item()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(step), strict=True))
    return first, second


def test_each_replay_draws_new_drop_path_masks():
    dropping = make_step("graph", "--drop-path", "0.5", "--weight-decay", "0")
    assert any(isinstance(m, DropPath) for m in dropping.net.modules())
    first, second = two_losses_at_lr_zero(dropping)
    assert first != second, "two replays drew the same drop-path masks"

    # the control: without drop-path, the same replay on the same batch and weights gives the same loss
    plain = make_step("graph", "--drop-path", "0", "--weight-decay", "0")
    assert not any(isinstance(m, DropPath) for m in plain.net.modules())
    first, second = two_losses_at_lr_zero(plain)
    assert first == second


class RecordingAugment:
    """The step's BatchAugment, keeping a copy of what it hands to the (captured) step."""

    def __init__(self, inner) -> None:
        self.inner, self.criterion = inner, inner.criterion
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.inner(images, labels)
        self.outputs.append((images.clone(), targets.clone()))
        return images, targets


def test_batch_augmentation_is_drawn_afresh_for_each_replay():
    random.seed(0)
    np.random.seed(0)  # timm's Mixup draws with numpy
    step = make_step("graph", "--drop-path", "0", "--weight-decay", "0", "--mixup", "0.8", "--cutmix", "1.0")
    step.augment = RecordingAugment(step.augment)
    settle(step, 32)
    images, labels = batch(32, 99)
    losses = []
    for _ in range(2):
        losses.append(step(images.clone(), labels, lr=0.0).item())  # the same input batch, weights kept
        fed_images, fed_targets = step.augment.outputs[-1]
        assert fed_targets.shape == (BATCH, NUM_CLASSES)  # soft targets: mixing is on
        static_images, static_targets = step._runner.static  # what the replay read is what augmentation just drew
        assert torch.equal(static_images, fed_images) and torch.equal(static_targets, fed_targets)
    (images_1, targets_1), (images_2, targets_2) = step.augment.outputs[-2:]
    assert not (torch.equal(images_1, images_2) and torch.equal(targets_1, targets_2))
    assert losses[0] != losses[1]  # same weights, same input batch: only the fresh draws differ


def test_fp16_cannot_be_captured_and_runs_eagerly():
    mode, why = resolve_step_mode("graph", torch.device("cuda"), torch.float16)
    assert mode == "eager"
    assert why and "\n" not in why
    step = TrainStep.for_config(
        parse_args(["--data", "x", "--model", "vit_local_test_patch16", "--image-size", "32", "--no-curriculum",
                    "--batch-size", str(BATCH), "--device", "cuda", "--amp", "fp16", "--step", "graph"]),
        NUM_CLASSES, torch.device("cuda"), image_size=32)
    assert step.mode == "eager" and step.scaler.is_enabled()
    for i in range(2):
        assert math.isfinite(step(*batch(32, i)).item())
    assert not step.captured


def test_the_fused_ffn_captured_trains_as_pytorchs_ops_eagerly():
    """--fused-ffn on (Triton kernels inside the captured graph) against --fused-ffn off, eager: the same losses."""
    eager = make_step("eager", "--drop-path", "0", "--fused-ffn", "off")
    graph = make_step("graph", "--drop-path", "0", "--fused-ffn", "on")
    assert [m.fused for m in graph.net.modules() if hasattr(m, "fused")] == [True] * 4
    assert not any(getattr(m, "fused", False) for m in eager.net.modules())
    graph.net.load_state_dict(eager.net.state_dict())
    losses = [(eager(images.clone(), labels, lr=LR).item(), graph(images.clone(), labels, lr=LR).item())
              for images, labels in (batch(32, seed) for seed in range(6))]
    assert graph.captured
    torch.testing.assert_close(torch.tensor([g for _, g in losses]), torch.tensor([e for e, _ in losses]),
                               rtol=2e-2, atol=2e-2)
