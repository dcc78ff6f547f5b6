"""Shared fixtures: tiny generated ImageNet-layout folders, and a fake clock for whole vit-train runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

# Without a GPU, Triton kernels (the fused locality FFN's) run in Triton's interpreter, on CPU tensors. Triton fixes
# the mode when it is first imported (timm imports it, through torch._dynamo), so it is chosen here, before any test
# module is imported; on a CUDA machine the kernels compile and run on the GPU as in training.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

# One dominant colour per class: after decode, crop and normalize, the brightest channel names the label.
CLASS_COLOURS = {"a_red": (200, 30, 30), "b_green": (30, 200, 30), "c_blue": (30, 30, 200)}


def make_colour_dataset(root: Path, train_per_class: int = 8, val_per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(40, 120, size=2)
                noise = rng.normal(0, 20, size=(h, w, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


class FakeTime:
    """The clock of a whole vit-train run in a test: each training step charges ``step_s`` of fake time
    (``settle_s`` while the step settles), each val batch ``eval_batch_s``; nothing else costs any, so every budget
    decision is the same on a loaded machine as on an idle one."""

    def __init__(self, step_s: float = 1.0, settle_s: float = 1.0, eval_batch_s: float = 0.1) -> None:
        self.now = 1000.0
        self.step_s, self.settle_s, self.eval_batch_s = step_s, settle_s, eval_batch_s
        self.budgets = 0  # budgets vit-train made on this clock

    def __call__(self) -> float:
        return self.now


def run_on_fake_time(setattr_: Callable[[object, str, object], None], time: FakeTime) -> FakeTime:
    """``trainer.cli.main`` runs on ``time``: its Budget reads the fake clock, and each Trainer's steps and
    evaluations advance it (the harness of tests/test_trainer.py, through the real CLI). ``setattr_`` is
    ``monkeypatch.setattr``, or ``setattr`` in a spawned process."""
    import trainer.cli
    from tests.test_trainer import TickingStep
    from trainer.budget import Budget
    from trainer.loop import Trainer

    def budget(seconds: float, spent_before: float = 0.0, start: float | None = None) -> Budget:
        time.budgets += 1  # the start-up before it cost no fake time: the run starts at the budget's creation
        return Budget(seconds, clock=time, spent_before=spent_before)

    run = Trainer.run

    def ticking_run(self: Trainer) -> dict:
        assert time.budgets, "vit-train no longer makes its Budget in trainer.cli: the fake clock is not in use"
        self.step = TickingStep(self.step, time, time.step_s, time.settle_s)
        measure = self.evaluator.evaluate_model

        def ticking_evaluate(net, batches, amp):
            def charged():
                for batch in batches:
                    time.now += time.eval_batch_s
                    yield batch
            return measure(net, charged(), amp)

        self.evaluator.evaluate_model = ticking_evaluate
        return run(self)

    setattr_(trainer.cli, "Budget", budget)
    setattr_(Trainer, "run", ticking_run)
    return time


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """vit-train runs in this test on a fake clock (see ``FakeTime``); set its costs before the run."""
    return run_on_fake_time(monkeypatch.setattr, FakeTime())
