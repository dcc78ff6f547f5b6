"""The training step on the CPU: mode selection, the step itself, fresh augmentation draws, device-neutral optimizer
state. (The captured CUDA-graph step is checked against this one in test_step_gpu.py, on a GPU.)"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.config import load_run_config, parse_args
from trainer.step import TrainStep, load_optimizer_state, make_optimizer, optimizer_state_dict, resolve_step_mode

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("asked", "device", "amp", "runs", "says"),
    [
        ("auto", CPU, None, "eager", None),
        ("auto", CUDA, torch.bfloat16, "graph", None),
        ("auto", CUDA, None, "graph", None),
        ("auto", CUDA, torch.float16, "eager", None),
        ("graph", CUDA, torch.bfloat16, "graph", None),
        ("graph", CUDA, torch.float16, "eager", "grad scaler"),
        ("graph", CPU, None, "eager", "need a CUDA device"),
        ("compile", CPU, None, "compile", None),
        ("eager", CUDA, torch.bfloat16, "eager", None),
    ],
)
def test_step_mode_resolution(asked, device, amp, runs, says):
    """--step resolved per device and amp: the mode that runs, and one line starting with --step graph when it is
    not the one asked for."""
    mode, why = resolve_step_mode(asked, device, amp)
    assert mode == runs
    if says is None:
        assert why is None
    else:
        assert says in why and "\n" not in why and why.startswith("--step graph")


def test_step_flags_and_the_compile_alias(tmp_path):
    """--step defaults to auto, --compile means --step compile, and an old config.json's compile: true too."""
    assert parse_args(["--data", "x"]).step == "auto"
    assert parse_args(["--data", "x", "--step", "graph"]).step == "graph"
    assert parse_args(["--data", "x", "--compile"]).step == "compile"
    # a run directory written before --step existed resumes with what its --compile meant
    (tmp_path / "config.json").write_text(json.dumps({"data": "x", "compile": True, "budget_s": 60.0}))
    assert load_run_config(tmp_path).step == "compile"


def _step(*flags: str, mode: str = "eager") -> TrainStep:
    torch.manual_seed(0)
    cfg = parse_args(["--data", "x", "--model", "vit_local_test_patch16", "--device", "cpu", *flags])
    return TrainStep.for_config(cfg, num_classes=4, device=CPU, image_size=32, mode=mode)


def _batch(n: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, size, size, 3, generator=g).permute(0, 3, 1, 2)  # NHWC memory, as DALI gives
    return images, torch.arange(n) % 4


def test_the_eager_step_trains_and_settles_after_one_step():
    """The eager step settles after one step, lowers the loss over 8, and settles again after prepare()."""
    step = _step("--lr", "0.05")
    images, labels = _batch()
    assert step.settling and step.settle_steps == 1
    losses = [step(images.clone(), labels).item() for _ in range(8)]
    assert not step.settling and step.steps == 8
    assert losses[-1] < losses[0]
    assert not step.diverged()
    step.prepare()  # a stage change: the next step settles again
    assert step.settling


def test_a_non_finite_loss_is_flagged_on_the_device():
    """A NaN pixel makes diverged() true; finite steps leave it false."""
    step = _step()
    images, labels = _batch()
    step(images.clone(), labels)
    assert not step.diverged()
    images[0, 0, 0, 0] = float("nan")
    step(images, labels)
    assert step.diverged()


def test_two_consecutive_steps_draw_fresh_augmentations():
    """Mixup/cutmix and erasing draw on the host, outside any captured graph: the same batch twice must not get the
    same targets or pixels."""
    step = _step("--mixup", "0.8", "--cutmix", "1.0", "--reprob", "1.0")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    criterion = step.augment.criterion

    def recording(logits, targets):
        seen.append((targets.clone(), logits.detach().clone()))
        return criterion(logits, targets)

    step.augment.criterion = recording
    images, labels = _batch()
    step(images.clone(), labels, lr=0.0)
    step(images.clone(), labels, lr=0.0)
    (t1, _), (t2, _) = seen
    assert t1.shape == (8, 4) and not torch.equal(t1, t2)


def test_learning_rate_is_set_per_step():
    """The lr given to a step is every group's lr; at lr 0 no weight moves, at 1e-2 the head does."""
    step = _step()
    step.set_lr(0.123)
    assert {g["lr"] for g in step.optimizer.param_groups} == {0.123}
    images, labels = _batch()
    before = {k: v.clone() for k, v in step.net.state_dict().items()}
    step(images.clone(), labels, lr=0.0)  # lr 0: AdamW moves nothing, decoupled decay included
    assert all(torch.equal(before[k], v) for k, v in step.net.state_dict().items())
    assert {g["lr"] for g in step.optimizer.param_groups} == {0.0}
    step(images.clone(), labels, lr=1e-2)
    assert not torch.equal(before["head.weight"], step.net.state_dict()["head.weight"])


def test_optimizer_state_from_a_captured_run_loads_into_an_eager_one_and_back():
    """A graph run's optimizer state (capturable, fused, tensor lr) loads into an eager CPU optimizer, which
    steps."""
    step = _step()
    images, labels = _batch()
    step(images, labels, lr=1e-3)
    saved = optimizer_state_dict(step.optimizer)
    # what a GPU graph run writes: capturable and fused groups, a device-tensor lr (stored as a float by
    # optimizer_state_dict), step counts as float tensors
    for group in saved["param_groups"]:
        group.update(capturable=True, fused=True, lr=torch.tensor(3e-4))
    restored = make_optimizer(step.net, 0.05, 1e-3, CPU, graph=False)
    load_optimizer_state(restored, saved)
    for group in restored.param_groups:
        assert group["capturable"] is False and not group["fused"] and isinstance(group["lr"], float)
        for p in group["params"]:
            assert restored.state[p]["step"].device.type == "cpu"
    torch.testing.assert_close(restored.state[step.net.pos_embed]["exp_avg"],
                               step.optimizer.state[step.net.pos_embed]["exp_avg"])
    restored.step()  # and it steps


def test_checkpointed_optimizer_state_has_plain_float_learning_rates():
    """optimizer_state_dict stores tensor lrs as floats and leaves the live optimizer's untouched."""
    step = _step()
    for group in step.optimizer.param_groups:
        group["lr"] = torch.tensor(2e-4)
    saved = optimizer_state_dict(step.optimizer)
    assert all(isinstance(g["lr"], float) and g["lr"] == pytest.approx(2e-4) for g in saved["param_groups"])
    assert all(isinstance(g["lr"], torch.Tensor) for g in step.optimizer.param_groups)  # the live one untouched


def test_graph_mode_is_refused_without_cuda():
    """A graph TrainStep on the CPU raises a ValueError saying it needs CUDA."""
    with pytest.raises(ValueError, match="needs CUDA"):
        _step(mode="graph")
