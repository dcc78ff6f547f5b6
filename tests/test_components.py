"""The loop's components, each on its own: the one learning-rate function at hand-computed points, the plan and the
run asking the same function for a stage's batch (under data-parallel too), and the trackers' names."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trainer.config import parse_args
from trainer.data import stage_batch
from trainer.metrics import namespaced, plan_lines
from trainer.schedule import lr_at


def config(*flags: str, world_size: int = 1):
    cfg = parse_args(["--data", "x", "--device", "cpu", "--budget", "100s", "--lr", "8e-3", "--batch-size", "64",
                      "--min-lr", "1e-5", "--warmup", "10%", "--lr-schedule", "cosine-time", *flags])
    return replace(cfg, world_size=world_size)


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.20, 0.0),  # the first training step: the warm-up starts at 0
    (0.24, 1e-3),  # halfway through the warm-up (5% of the 80% left): half the stage's peak
    (0.28, 2e-3),  # the warm-up done: the stage's peak
    (0.64, 2e-3 * (0.005 + 0.995 * 0.5)),  # halfway through the cosine: half way to the floor's share
    (1.00, 1e-5),  # the budget spent: the floor
])
def test_lr_at_composes_the_batch_rule_the_stage_rule_the_clock_the_warmup_and_the_floor(fraction, expected):
    # batch rule: 8e-3 per 512 images at 64 = 1e-3; stage rule: a stage batch of 256 is 4x, x sqrt(4) = 2e-3;
    # clock: 20% of the budget was spent before the first step, so the schedule runs over the 80% left
    cfg = config()
    assert lr_at(cfg, 256, fraction, train_from=0.2) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_lr_at_follows_the_global_batch_of_a_data_parallel_run():
    # two processes of 64: a global batch of 128, 8e-3 x 128 / 512 = 2e-3 at the peak (warm-up done, clock at 0.1)
    assert lr_at(config(world_size=2), 64, 0.1) == pytest.approx(2e-3)
    assert lr_at(config(world_size=1), 64, 0.1) == pytest.approx(1e-3)


def test_the_printed_plan_shows_the_batch_each_process_runs():
    """--stage-batch tokens grows the 32-px batch towards 64 x 49, capped by --max-batch and by the images each
    process reads: 300 images over 2 processes cap it at 150, then a multiple of 8, 144 (the plan once said 296)."""
    cfg = config("--stage-batch", "tokens", "--curriculum", "32:32:1", world_size=2)
    assert stage_batch(cfg, 32, 300) == 144
    assert stage_batch(replace(cfg, world_size=1), 32, 300) == 296
    rows = [line.split() for line in plan_lines(cfg.plan(), cfg, 300)[1:]]
    assert [(int(r[2]), int(r[-1])) for r in rows] == [(s.image_size, stage_batch(cfg, s.image_size, 300))
                                                       for s in cfg.plan().stages()]
    assert rows[0][-1] == "144" and rows[-1][-1] == "64"  # the final size runs --batch-size


def test_trackers_see_the_namespaced_names_of_what_the_loop_logs():
    fields = {"step": 7, "loss": 0.5, "lr": 1e-3, "images_per_sec": 10.0, "mfu": None, "image_size": 64,
              "elapsed_s": 3.0}
    assert namespaced("train", fields) == {"train/loss": 0.5, "train/lr": 1e-3, "train/images_per_sec": 10.0,
                                           "stage/image_size": 64, "budget/elapsed_s": 3.0}
    assert namespaced("eval", {"top1": 0.9, "top5": 1.0, "image_size": 96}) == {
        "val/top1": 0.9, "val/top5": 1.0, "val/image_size": 96}
    assert namespaced("stage", {"image_size": 64}) == {}
