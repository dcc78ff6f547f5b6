"""The Trainer's stop decisions, driven by a fake clock: steps, stage entries and evaluations cost what the test says,
so every decision is checked exactly, not through wall-clock windows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from pipelines import Split
from pipelines.synthetic import SyntheticLoader
from trainer.budget import Budget, StopGate
from trainer.config import parse_args
from trainer.evaluate import evaluate
from trainer.loop import Trainer
from trainer.readout import Readout
from trainer.rundir import RunDir

STEPS_PER_EPOCH = 5
VAL_BATCHES = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TickingStep:
    """The real TrainStep, with each call charged ``settle_s`` (while settling) or ``step_s`` of fake time."""

    def __init__(self, step, clock: FakeClock, step_s: float, settle_s: float) -> None:
        self._step, self._clock, self.step_s, self.settle_s = step, clock, step_s, settle_s
        self.lrs: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self._step, name)

    def __call__(self, images, labels, lr=None):
        self._clock.now += self.settle_s if self._step.settling else self.step_s
        self.lrs.append(lr)
        return self._step(images, labels, lr=lr)


def _synthetic(split, spec, *, train: bool, device, on_fallback=None):
    return SyntheticLoader(len(split.classes), spec, steps_per_epoch=STEPS_PER_EPOCH if train else VAL_BATCHES,
                           device=device)


def _trainer(tmp_path: Path, flags: list[str], *, step_s: float = 1.0, settle_s: float = 1.0,
             eval_batch_s: float = 0.5) -> tuple[Trainer, FakeClock]:
    cfg = parse_args(["--data", "synthetic", "--model", "vit_local_test_patch16", "--batch-size", "4", "--lr", "1e-2",
                      "--device", "cpu", "--log-every", "1000", "--ckpt-every", "1000h", "--workers", "1", *flags])
    n = STEPS_PER_EPOCH * cfg.batch_size
    split = Split(root=Path("synthetic"), files=("x",) * n, labels=(0,) * n, classes=("a", "b", "c"))

    clock = FakeClock()
    budget = Budget(cfg.budget_s, clock=clock)
    readout = Readout(cfg.budget_s, clock=lambda: budget.elapsed, live=False, console=Console(file=io.StringIO()))
    trainer = Trainer(cfg, split, split, RunDir(tmp_path / "run"), readout, budget, loader=_synthetic)
    trainer.step = TickingStep(trainer.step, clock, step_s, settle_s)

    def ticking_evaluate(net, batches, amp):
        def ticking():
            for batch in batches:
                clock.now += eval_batch_s
                yield batch
        return evaluate(net, ticking(), amp)

    trainer.evaluator.evaluate_model = ticking_evaluate
    return trainer, clock


def _events(trainer: Trainer, name: str) -> list[dict]:
    trainer.run_dir.close()
    lines = (trainer.run_dir.path / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_the_run_stops_at_the_last_step_that_fits_and_ends_inside_its_budget(tmp_path):
    trainer, _ = _trainer(tmp_path, ["--image-size", "32", "--no-curriculum", "--budget", "60s",
                                     "--eval-every", "0"], step_s=1.0, eval_batch_s=0.5)
    summary = trainer.run()
    # the probe timed 3 of the 4 val batches: estimate = 2 x first + 3 x per batch = 2.5 s (the real one is 2 s)
    probe = _events(trainer, "eval_probe")[0]
    assert probe["estimate_s"] == pytest.approx(2.5)
    reserve = 2.5 * 1.2 + 1.0  # what the stop decision kept back (checkpoints cost no fake time)
    assert trainer.gate.reserve_s == pytest.approx(2.0 * 1.2 + 1.0)  # after it, the measured evaluation
    assert summary["elapsed_s"] <= 60
    # stopped because one more 1-s step would have eaten into the reserve, not earlier
    assert summary["train_s"] + 1.0 + reserve > 60
    assert summary["train_s"] + reserve <= 60
    assert summary["elapsed_s"] == pytest.approx(summary["train_s"] + VAL_BATCHES * 0.5)


def test_the_lr_schedule_starts_at_the_first_training_step_not_at_process_start(tmp_path):
    trainer, clock = _trainer(tmp_path, ["--image-size", "32", "--no-curriculum", "--budget", "100s",
                                         "--eval-every", "0", "--warmup", "10%"], step_s=1.0, eval_batch_s=0.1)
    clock.now += 30.0  # imports, indexing, the first pipeline build: 30% of the budget gone before any step
    trainer.run()
    lrs, peak = trainer.step.lrs, trainer.state.peak_lr
    assert trainer.state.train_from == pytest.approx(0.3, abs=0.01)
    # the warm-up is 10% of the ~70 s left (7 steps), not the 10 s of the budget start-up already spent
    assert lrs[0] < 0.05 * peak and lrs[3] < 0.6 * peak
    assert max(lrs) == pytest.approx(peak, rel=0.02) and lrs.index(max(lrs)) in range(6, 9)
    assert lrs[-1] < 1.1 * trainer.cfg.min_lr  # and the decay still ends at the floor, with the budget


def test_an_expensive_final_evaluation_is_reserved_before_any_was_measured(tmp_path):
    # The GPU case that overran: --eval-every 0, and an evaluation that costs a lot next to a step.
    trainer, _ = _trainer(tmp_path, ["--image-size", "32", "--no-curriculum", "--budget", "40s",
                                     "--eval-every", "0"], step_s=0.2, eval_batch_s=2.0)
    summary = trainer.run()
    assert summary["elapsed_s"] <= 40
    assert 40 - summary["elapsed_s"] < 0.2 + 2.0 * 1.2 * 2.5 + 1.0  # and not much under it


def test_a_stage_whose_entry_cannot_fit_is_not_entered_and_training_goes_on(tmp_path):
    # Stage 0 (32 px, 4 tokens) takes 10 s to settle; stage 1 (48 px, 9 tokens) is then estimated at
    # 1.2 x 10 x 9/4 = 27 s, more than the ~24 s left after the first epoch and the reserve.
    trainer, _ = _trainer(tmp_path, ["--image-size", "48", "--curriculum", "32:16:1", "--budget", "40s",
                                     "--eval-every", "0"], step_s=1.0, settle_s=10.0, eval_batch_s=0.1)
    summary = trainer.run()
    skipped = _events(trainer, "stage_skipped")
    assert len(skipped) == 1 and skipped[0]["image_size"] == 48
    assert skipped[0]["entry_estimate_s"] == pytest.approx(27.0)
    assert summary["stages_reached"] == 1 and summary["stages_skipped"]
    assert summary["epochs"] > 1.5  # it kept training at 32 px after the refused boundary
    assert summary["elapsed_s"] <= 40
    ready = _events(trainer, "stage_ready")
    assert ready[0]["entry_s"] == pytest.approx(10.0)  # the settling step, measured: nothing else cost fake time


def test_with_time_enough_every_stage_is_entered_and_its_first_step_is_charged(tmp_path):
    trainer, _ = _trainer(tmp_path, ["--image-size", "48", "--curriculum", "32:16:1", "--budget", "120s",
                                     "--eval-every", "1"], step_s=1.0, settle_s=4.0, eval_batch_s=0.1)
    summary = trainer.run()
    assert summary["stages_reached"] == 2 and not summary["stages_skipped"]
    stages = _events(trainer, "stage")
    assert [s["image_size"] for s in stages] == [32, 48]
    ready = _events(trainer, "stage_ready")
    assert [r["entry_s"] for r in ready] == pytest.approx([4.0, 4.0])
    assert summary["elapsed_s"] <= 120
    # one probe at the start; from the first periodic evaluation on, measured evaluations set the reserve
    assert len(_events(trainer, "eval_probe")) == 1 and len(_events(trainer, "eval")) >= 2
    assert trainer.gate.eval_s == pytest.approx(VAL_BATCHES * 0.1)


def test_evaluation_time_uncharged_means_no_probe_and_no_reserve_for_it(tmp_path):
    trainer, _ = _trainer(tmp_path, ["--image-size", "32", "--no-curriculum", "--budget", "30s",
                                     "--eval-every", "0", "--budget-counts", "train"], eval_batch_s=5.0)
    summary = trainer.run()
    assert not _events(trainer, "eval_probe")
    assert trainer.gate.reserve_s == pytest.approx(1.0)  # the margin only
    assert summary["train_s"] <= 30 and summary["train_s"] + 1.0 + 1.0 > 30


def test_the_gate_uses_settling_steps_as_an_upper_bound_then_the_moving_average():
    now = [0.0]
    gate = StopGate(Budget(100, clock=lambda: now[0]))
    assert gate.can_enter_stage(4)  # nothing measured yet: the first stage is always entered
    gate.begin_stage(4)
    now[0] = 6.0
    gate.record_step(6.0, settling=True)  # warm-up / capture
    assert gate.step_s == 6.0  # the next step is expected to cost as much until one is measured
    gate.stage_settled()
    now[0] = 7.0
    gate.record_step(1.0, settling=False)
    assert gate.step_s == 1.0 and gate.entry_s == pytest.approx(6.0)
    now[0] = 9.0
    gate.record_step(2.0, settling=False)
    assert gate.step_s == pytest.approx(1.1)
    assert gate.entry_estimate(16) == pytest.approx(1.2 * 6.0 * 4)
    assert gate.entry_estimate(2) == pytest.approx(1.2 * 6.0)  # never scaled below the last entry
    # an entry with a fixed part (rebuild, checkpoint: 4 s) before its settling step (2 s): only the step scales
    gate.begin_stage(16)
    now[0] += 4.0
    now[0] += 2.0
    gate.record_step(2.0, settling=True)
    gate.stage_settled()
    assert gate.entry_s == pytest.approx(6.0) and gate.entry_steps_s == pytest.approx(2.0)
    assert gate.entry_estimate(64) == pytest.approx(1.2 * (4.0 + 2.0 * 4))
    gate.record_checkpoint(2.0)
    gate.record_eval(10.0)
    assert gate.reserve_s == pytest.approx((10.0 + 2 * 2.0) * 1.2 + 1.0)
    now[0] = 100 - gate.reserve_s - gate.step_s  # the settling step's 2 s: the estimate until a steady one
    assert gate.step_s == 2.0 and gate.should_continue()
    now[0] += 0.01
    assert not gate.should_continue()


def test_the_ema_copy_follows_the_model_across_a_stage_change(tmp_path):
    trainer, _ = _trainer(tmp_path, ["--image-size", "48", "--curriculum", "32:16:1", "--budget", "100s",
                                     "--eval-every", "0", "--ema", "0.9"], step_s=1.0, eval_batch_s=0.1)
    summary = trainer.run()
    assert summary["stages_reached"] == 2 and summary["image_size"] == 48
    ema, net = trainer.step.ema.module, trainer.net
    assert ema.pos_embed.shape == net.pos_embed.shape == (1, 1 + 9, 96)
    assert not torch.equal(ema.pos_embed, net.pos_embed)  # averaged, not copied
    assert trainer.evaluated is ema


def _stage_starts(trainer: Trainer) -> list[tuple[int, float]]:
    return [(e["image_size"], e["elapsed_s"]) for e in _events(trainer, "stage")]


def test_a_budget_too_short_for_the_epoch_form_still_reaches_the_final_size_in_the_time_form(tmp_path):
    # An epoch is 5 steps of 1 s. The epoch form 32:16:5 needs 25 s of training before its second stage: in a 20-s
    # budget it never leaves 32 px. The time form 32:16@50% reaches 64 px at half the budget.
    flags = ["--image-size", "64", "--budget", "20s", "--eval-every", "0", "--log-every", "0.5"]
    epochs, _ = _trainer(tmp_path / "e", [*flags, "--curriculum", "32:16:5"], step_s=1.0, eval_batch_s=0.05)
    assert epochs.run()["stages_reached"] == 1
    timed, _ = _trainer(tmp_path / "t", [*flags, "--curriculum", "32:16@50%"], step_s=1.0, eval_batch_s=0.05)
    summary = timed.run()
    assert summary["image_size"] == 64 and summary["stages_reached"] == 3
    starts = _stage_starts(timed)
    assert [size for size, _ in starts] == [32, 48, 64]
    # 32 and 48 px share the first 50% by image side: 48 px begins at 50% x 32/80 = 20% (4 s), 64 px at 10 s; each
    # change comes at the first step boundary after its moment, mid-epoch (epochs end at 5-s multiples here)
    probe_s = _events(timed, "eval_probe")[0]["elapsed_s"]
    assert 4.0 <= starts[1][1] < 4.0 + 1.0 + 1e-9 and starts[1][1] != probe_s + 5.0
    assert 10.0 <= starts[2][1] < 10.0 + 1.0 + 1e-9
    assert summary["elapsed_s"] <= 20
    # no periodic evaluation after a pass cut short (--eval-every 1 here would have evaluated after each)
    cut, _ = _trainer(tmp_path / "c", [*flags[:4], "--eval-every", "1", "--log-every", "0.5",
                                       "--curriculum", "32:16@50%"], step_s=1.0, eval_batch_s=0.05)
    cut.run()
    cut.run_dir.close()
    events = [json.loads(line) for line in (cut.run_dir.path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    pass_start, last_step, checked = 0, 0, 0
    for e in events:  # every train step is logged here (1-s steps, 0.5-s interval)
        if e["event"] == "train":
            last_step = e["step"]
        elif e["event"] == "stage":
            pass_start = last_step  # a new pass begins at every stage change
        elif e["event"] == "eval" and e is not evals[-1]:  # periodic ones: after whole passes only
            assert e["step"] - pass_start == STEPS_PER_EPOCH
            pass_start, checked = e["step"], checked + 1
    assert checked >= 1
    # the plan in epochs, from the measured speed, once per stage
    plans = _events(timed, "plan")
    assert [p["stage"] for p in plans] == [0, 1, 2] and set(plans[0]["projected_epochs"]) == {"32", "48", "64"}
    # a pass cut short by a stage change counts for what it read
    assert summary["epochs"] == pytest.approx(summary["images_seen"] / (STEPS_PER_EPOCH * 4))


def test_a_resumed_time_placed_run_keeps_its_plan(tmp_path):
    from trainer.checkpoint import list_checkpoints, load_checkpoint
    from trainer.loop import StopFlag, StopRequested

    flags = ["--image-size", "64", "--curriculum", "32:16@50%", "--budget", "20s", "--eval-every", "0"]
    first, clock = _trainer(tmp_path / "a", flags, step_s=1.0, eval_batch_s=0.05)
    first.stop = StopFlag()
    real_step = first.step

    class StopAfter:  # SIGTERM after the 7th step: 48 px reached (4 s), 64 px (10 s) not yet
        def __getattr__(self, name):
            return getattr(real_step, name)

        def __call__(self, *a, **k):
            loss = real_step(*a, **k)
            if real_step.steps >= 7:
                first.stop.reason = "SIGTERM"
            return loss

    first.step = StopAfter()
    with pytest.raises(StopRequested):
        first.run()
    payload = load_checkpoint(list_checkpoints(first.run_dir.path / "checkpoints")[-1])
    assert payload["state"]["image_size"] == 48 and 7 <= payload["budget_spent_s"] < 10

    # a new process: its clock starts anew, the budget account carries over
    cfg = first.cfg
    budget = Budget(cfg.budget_s, clock=clock, spent_before=payload["budget_spent_s"])
    readout = Readout(cfg.budget_s, clock=lambda: budget.elapsed, live=False, console=Console(file=io.StringIO()))
    second = Trainer(cfg, first.train_split, first.val_split, RunDir(first.run_dir.path), readout, budget,
                     resume=payload, loader=_synthetic)
    second.step = TickingStep(second.step, clock, 1.0, 1.0)
    summary = second.run()
    assert summary["image_size"] == 64 and summary["attempts"] == 2
    resumed = [(e["image_size"], e["elapsed_s"]) for e in _events(second, "stage")]
    assert resumed[-1][0] == 64 and 10.0 <= resumed[-1][1] < 11.0 + 1e-9  # the same moment as in one process
    assert summary["elapsed_s"] <= 20
