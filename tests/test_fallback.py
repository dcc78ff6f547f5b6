"""The fast paths fall back where they first fail (trainer/fastpath.py): each failure is injected where it would
happen on a GPU — the graph capture, a compiled step's first call, the Triton launcher, a fused op that returns wrong
numbers, the GPU decoder's build — and the run goes on inside its budget, says so once, records what ran, and
trains on from the same state (the same weights as a run that never tried the fast path)."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

import pipelines.loader
import trainer.loop
import trainer.step
from model import fused_ffn
from model.locality_vit import LocalityFeedForward
from pipelines import Split, StageLoader, StageSpec, index_dataset
from tests.test_trainer import FakeClock, TickingStep, _synthetic
from trainer.budget import Budget
from trainer.cli import main
from trainer.config import parse_args
from trainer.evaluate import evaluate
from trainer.fastpath import FastPathError, FastPaths
from trainer.loop import Trainer
from trainer.readout import Readout
from trainer.rundir import RunDir
from trainer.step import GRAPH_WARMUP_STEPS, TrainStep

FLAGS = ["--model", "vit_local_test_patch16", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu",
         "--log-every", "1000", "--ckpt-every", "1000h", "--workers", "1", "--image-size", "32", "--no-curriculum",
         "--budget", "30s", "--eval-every", "0", "--drop-path", "0"]


def make_trainer(tmp_path: Path, *flags: str, split: Split | None = None, loader=_synthetic, name: str = "run"):
    """A trainer on a fake clock (1 s a step, 0.1 s a val batch), and its console."""
    cfg = parse_args(["--data", "x", *FLAGS, *flags])
    if split is None:
        n = 5 * cfg.batch_size
        split = Split(root=Path("synthetic"), files=("x",) * n, labels=(0,) * n, classes=("a", "b", "c"))
    clock = FakeClock()
    budget = Budget(cfg.budget_s, clock=clock)
    console = io.StringIO()
    readout = Readout(cfg.budget_s, clock=lambda: budget.elapsed, live=False, console=Console(file=console))
    torch.manual_seed(0)
    t = Trainer(cfg, split, split, RunDir(tmp_path / name), readout, budget, loader=loader)
    t.step = TickingStep(t.step, clock, 1.0, 1.0)

    def ticking_evaluate(net, batches, amp):
        def ticking():
            for batch in batches:
                clock.now += 0.1
                yield batch
        return evaluate(net, ticking(), amp)

    t.evaluator.evaluate_model = ticking_evaluate
    return t, console


def run_trainer(tmp_path: Path, *flags: str, **kwargs):
    """A whole run: its trainer, summary and console text."""
    t, console = make_trainer(tmp_path, *flags, **kwargs)
    summary = t.run()
    t.run_dir.close()
    return t, summary, console.getvalue()


def events(t: Trainer, name: str) -> list[dict]:
    lines = (t.run_dir.path / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lower().startswith("warning")]


def adam_steps(t: Trainer) -> set[int]:
    return {int(state["step"]) for state in t.step.optimizer.state.values()}


def assert_finished_in_budget(t: Trainer, summary: dict) -> None:
    assert summary["elapsed_s"] <= t.cfg.budget_s
    assert summary["steps"] == t.state.step > GRAPH_WARMUP_STEPS + 1
    # every step counted once: AdamW's own count is the run's
    assert adam_steps(t) == {summary["steps"]}
    assert not list(t.run_dir.path.rglob("*.tmp"))  # nothing half-written


class FailingCapture:
    """The captured step's runner, with a capture that fails (as a CUDA capture error would); its warm-up steps
    run eagerly, as the real runner's do on a side stream."""

    captured = False

    def __init__(self, step: TrainStep) -> None:
        self.step = step

    def __call__(self, images, targets):
        if self.step.times.steps < GRAPH_WARMUP_STEPS:
            self.step.optimizer.zero_grad(set_to_none=True)
            return self.step._step(images, targets)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing (injected)\nmore detail")

    def reset(self) -> None:
        pass


def test_step_fallback_a_failed_capture_runs_on_eagerly_from_the_same_state(tmp_path, monkeypatch):
    eager, eager_summary, _ = run_trainer(tmp_path, "--step", "eager", name="eager")

    monkeypatch.setattr(trainer.loop, "resolve_step_mode", lambda *a, **k: ("graph", None))
    monkeypatch.setattr(TrainStep, "graph_runner", FailingCapture)
    t, summary, console = run_trainer(tmp_path, name="graph")

    assert_finished_in_budget(t, summary)
    [event] = events(t, "fallback")
    assert event["path"] == "step" and event["failed"] == "graph" and event["to"] == "eager"
    assert event["step"] == GRAPH_WARMUP_STEPS  # the step that captured: trained once, eagerly
    assert "operation not permitted" in event["error"] and "\n" not in event["error"]
    assert summary["step_mode"] == "eager" and summary["stages"][0]["step_mode"] == "eager"
    assert summary["fallbacks"] == [{k: v for k, v in event.items() if k != "event"}]
    [line] = warnings(console)
    assert "captured step" in line and "eager step" in line
    # the curve goes on where it was: the same steps on the same batches give the eager run's very weights
    assert summary["steps"] == eager_summary["steps"]
    for a, b in zip(t.net.parameters(), eager.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_fallback_a_compile_error_at_the_first_step_runs_eagerly(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x):
            raise RuntimeError("backend='inductor' raised: CalledProcessError (injected)")

    monkeypatch.setattr(trainer.step.torch, "compile", lambda module, **_: Broken(module))
    t, summary, console = run_trainer(tmp_path, "--step", "compile")
    assert_finished_in_budget(t, summary)
    [event] = events(t, "fallback")
    assert (event["path"], event["failed"], event["to"], event["step"]) == ("step", "compile", "eager", 0)
    assert summary["stages"][0]["step_mode"] == "eager" and t.step.mode == "eager"
    # asked for by name: the line says so
    [line] = warnings(console)
    assert line.startswith("WARNING: you asked for --step compile")


class Kernels:
    """The Triton launcher (``model.fused_ffn._kernels``) with its forward launch replaced by ``launch``."""

    def __init__(self, real, launch) -> None:
        self.real, self.launch = real, launch

    def __getattr__(self, name):
        return getattr(self.real, name)

    @property
    def forward_kernel(self):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(self.real.forward_kernel[grid], *args, **kwargs)


def fused_on(monkeypatch, launch) -> None:
    monkeypatch.setattr(trainer.step, "resolve_fused_ffn", lambda *a, **k: True)  # on, as on a GPU
    kernels = Kernels(fused_ffn._kernels(True), launch)
    monkeypatch.setattr(fused_ffn, "_kernels", lambda interpret: kernels)


def fused_run(tmp_path: Path, monkeypatch, launch, *flags: str):
    fused_on(monkeypatch, launch)
    return run_trainer(tmp_path, "--ema", "0.9", *flags)


def ffns(module: torch.nn.Module) -> list[bool]:
    return [m.fused for m in module.modules() if isinstance(m, LocalityFeedForward)]


def test_ffn_fallback_a_triton_launch_error_runs_pytorchs_ops(tmp_path, monkeypatch):
    def launch(kernel, *args, **kwargs):
        raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory (injected)")

    t, summary, console = fused_run(tmp_path, monkeypatch, launch)
    assert_finished_in_budget(t, summary)
    [event] = events(t, "fallback")
    assert (event["path"], event["failed"], event["to"], event["step"]) == ("ffn", True, False, 0)
    assert "OutOfResources" in event["error"]
    assert ffns(t.net) == ffns(t.step.ema.module) == [False] * 4  # the evaluated copy too
    assert summary["fused_ffn"] is False and summary["stages"][0]["fused_ffn"] is False
    assert len(warnings(console)) == 1
    losses = [e["top1"] for e in events(t, "eval")]
    assert losses  # the final evaluation ran, on PyTorch's ops


def test_ffn_fallback_a_kernel_with_wrong_numbers_is_caught_before_it_trains(tmp_path, monkeypatch):
    def launch(kernel, h, w, y, *args, **kwargs):
        kernel(h, w, y, *args, **kwargs)
        y.mul_(1.5)  # a wrong result, launched without error

    t, summary, console = fused_run(tmp_path, monkeypatch, launch)
    assert_finished_in_budget(t, summary)
    [event] = events(t, "fallback")
    assert event["path"] == "ffn" and "differs from PyTorch's ops by" in event["error"]
    assert ffns(t.net) == [False] * 4
    [line] = warnings(console)
    assert "PyTorch's FFN ops" in line


def test_ffn_fallback_not_taken_when_the_kernel_agrees(tmp_path, monkeypatch):
    launched = []
    fused_on(monkeypatch, lambda kernel, *a, **k: launched.append(kernel(*a, **k)))
    t, console = make_trainer(tmp_path)  # (a whole run in Triton's interpreter would take minutes)
    t.paths.check_ffn(32, 4)
    t.paths.check_ffn(64, 2)
    t.run_dir.close()
    assert len(launched) == 2 and not events(t, "fallback") and not console.getvalue()
    assert t.paths.running["ffn"] is True and ffns(t.net) == [True] * 4


@pytest.fixture
def gpu_decoder_fails(monkeypatch):
    """Every stage asks for DALI's GPU decoder, whose pipeline build fails (as nvJPEG's allocation would)."""
    on = StageSpec.on

    def gpu_spec(device, decoder="auto", **fields):
        return replace(on(device, **fields), device="gpu", device_id=0)

    def build(builder):
        def failing(split, spec):
            if spec.device == "gpu":
                raise RuntimeError("nvJPEG error (5): NVJPEG_STATUS_ALLOCATOR_FAILURE (injected)")
            return builder(split, spec)
        return failing

    monkeypatch.setattr(trainer.loop.StageSpec, "on", staticmethod(gpu_spec))
    monkeypatch.setattr(pipelines.loader, "build_train_pipeline", build(pipelines.loader.build_train_pipeline))
    monkeypatch.setattr(pipelines.loader, "build_val_pipeline", build(pipelines.loader.build_val_pipeline))


def test_decoder_fallback_a_failed_gpu_pipeline_decodes_the_stage_on_the_cpu(tmp_path, colour_dataset,
                                                                            gpu_decoder_fails):
    train_split, _ = index_dataset(colour_dataset)
    t, summary, console = run_trainer(tmp_path, "--eval-every", "1", split=train_split, loader=StageLoader)
    assert_finished_in_budget(t, summary)
    found = events(t, "fallback")
    assert {e["path"] for e in found} == {"decoder"} and {(e["failed"], e["to"]) for e in found} == {("mixed", "cpu")}
    assert any("train pipeline" in e["why"] for e in found) and any("evaluation" in e["why"] for e in found)
    assert summary["decoder"] == "cpu" and summary["stages"][0]["decoder"] == "cpu"
    assert len(warnings(console)) == 1  # the same failure twice (train, then val): one line
    assert len(events(t, "eval")) >= 2  # evaluations ran on the CPU decoder's batches


def test_decoder_fallback_needs_a_handler_else_the_error_propagates(colour_dataset, gpu_decoder_fails):
    split, _ = index_dataset(colour_dataset)
    spec = StageSpec(image_size=32, batch_size=4, device="gpu", device_id=0, num_threads=1)
    with pytest.raises(RuntimeError, match="NVJPEG_STATUS_ALLOCATOR_FAILURE"):
        StageLoader(split, spec, train=True, device=torch.device("cpu")).set_stage(spec)
    seen = []
    loader = StageLoader(split, spec, train=True, device=torch.device("cpu"),
                         on_fallback=lambda *args: seen.append(args[:2]))
    images, labels = next(iter(loader))
    assert seen == [("mixed", "cpu")] and loader.decoder == "cpu"
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    loader.close()
    next(iter(loader))  # a rebuild of the same stage goes to the CPU at once: one fallback
    assert seen == [("mixed", "cpu")]
    loader.close()


def test_strict_fast_paths_stop_the_run_instead(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.loop, "resolve_step_mode", lambda *a, **k: ("graph", None))
    monkeypatch.setattr(TrainStep, "graph_runner", FailingCapture)
    with pytest.raises(FastPathError, match="--step graph failed .*--strict-fast-paths forbids"):
        run_trainer(tmp_path, "--strict-fast-paths")


def test_strict_fast_paths_exit_2_from_the_command_line(tmp_path, colour_dataset, monkeypatch, capsys):
    def launch(kernel, *args, **kwargs):
        raise RuntimeError("triton CompilationError (injected)")

    monkeypatch.setattr(trainer.step, "resolve_fused_ffn", lambda *a, **k: True)
    kernels = Kernels(fused_ffn._kernels(True), launch)
    monkeypatch.setattr(fused_ffn, "_kernels", lambda interpret: kernels)
    out = tmp_path / "run"
    code = main(["--data", str(colour_dataset), "--out", str(out), *FLAGS, "--strict-fast-paths"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vit-train: error: --fused-ffn on failed")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "error" and "--strict-fast-paths" in summary["message"]


def test_an_explicit_path_that_falls_back_says_so_loudly():
    said, logged = [], []
    paths = FastPaths(asked={"step": "graph", "ffn": "auto"}, running={"step": "graph", "ffn": True},
                      log=lambda event, **f: logged.append((event, f)),
                      say=lambda text, loud: said.append((text, loud)))
    paths.fell_back("step", "graph", "compile", RuntimeError("capture failed"), "why not")
    paths.fell_back("ffn", True, False, "off by 0.5")
    paths.fell_back("ffn", True, False, "off by 0.5")  # the same again: an event, no second line
    assert [loud for _, loud in said] == [True, False]
    assert said[0][0].startswith("WARNING: you asked for --step graph, but the captured step failed: RuntimeError: "
                                 "capture failed; running the compiled step instead (why not)")
    assert said[1][0].startswith("warning: the fused FFN kernel failed: off by 0.5")
    assert [e for e, _ in logged] == ["fallback"] * 3 and paths.running == {"step": "compile", "ffn": False}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
def test_thirty_stage_rebuilds_do_not_grow_memory(colour_dataset):
    """DALI has leaked across rebuilds (#3396, #6153): the loader frees each pipeline and hands pooled memory back."""
    split, _ = index_dataset(colour_dataset)
    spec = StageSpec(image_size=32, batch_size=4, num_threads=1)
    loader = StageLoader(split, spec, train=True, device=torch.device("cpu"))
    rss = []
    for i in range(30):
        loader.set_stage(StageSpec(image_size=32 + 16 * (i % 4), batch_size=4, num_threads=1, seed=i))
        images, _ = next(iter(loader))
        assert images.shape[-1] == 32 + 16 * (i % 4)
        rss.append(rss_mib())
    loader.close()
    assert rss[29] <= rss[4] * 1.03, f"resident memory grew from {rss[4]:.0f} MiB (5th) to {rss[29]:.0f} MiB (30th)"


def test_check_gpu_on_the_cpu_prints_what_runs(capsys, colour_dataset):
    code = main(["--check-gpu", "--data", str(colour_dataset), "--model", "vit_local_test_patch16",
                 "--batch-size", "4", "--image-size", "32", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    cells = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.strip().startswith("32  ")]
    rows = {(path, runs): (ms, result) for _, path, runs, ms, result in cells}
    assert rows[("step", "graph")] == ("-", "not available on CPU")
    assert rows[("fused FFN", "fused")] == ("-", "not available on CPU")
    assert rows[("decoder", "mixed")] == ("-", "not available on CPU")
    for works in (("decoder", "cpu"), ("step", "eager"), ("fused FFN", "PyTorch ops")):
        assert rows[works][1] == "works" and float(rows[works][0]) > 0
    assert "no GPU here" in out
