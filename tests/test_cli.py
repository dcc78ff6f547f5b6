"""vit-train end to end, in this process: bad input is refused with one line and exit code 2 and writes nothing;
runs on the colour set (on the fake clock of conftest.FakeTime, so every budget decision is exact) learn, stop at
the last step that fits, cross stages, and end on a corrupt image or a divergence with one line and their files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_colour_dataset
from trainer.cli import main

TINY = ["--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "8", "--workers", "1"]


def _refused(capsys, argv: list[str], out: Path, needle: str) -> None:
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda root: root / "nope", "data folder not found"),
        (lambda root: root, "has no train/ folder"),
        (lambda root: (root / "train").mkdir() or root, "no class subfolders"),
        (lambda root: (root / "train" / "cls").mkdir(parents=True) or root, "holds no images"),
    ],
    ids=["missing", "empty", "no-class-folders", "no-images"],
)
def test_bad_data_folder_exits_2(tmp_path, capsys, make, needle):
    """A missing, empty or image-less data folder: exit 2, one stderr line naming the problem, no run folder."""
    root = tmp_path / "data"
    root.mkdir()
    data = make(root)
    _refused(capsys, ["--data", str(data), "--budget", "10s"], tmp_path / "run", needle)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--budget", "soon"], "--budget"),
        (["--budget", "0m"], "--budget"),
        (["--image-size", "30"], "--image-size: 30 is not a positive multiple of the patch size 16"),
        (["--batch-size", "0"], "--batch-size"),
        (["--curriculum", "40:32:5"], "--curriculum: the start size 40 is not a multiple"),
        (["--curriculum", "32:32:0"], "--curriculum: the epochs per stage N must be positive"),
        (["--curriculum", "64:32:5", "--image-size", "32"], "--curriculum: the start size 64 must lie in"),
        (["--eval-size", "50"], "--eval-size: 50 is not a positive multiple"),
        (["--model", "deit_small_patch16_224", "--act", "gelu"], "--act gelu applies to the locality models"),
        (["--batch-size", "25"], "--batch-size 25 is larger than the 24 images"),
    ],
)
def test_bad_flags_exit_2(tmp_path, capsys, colour_dataset, flags, needle):
    """Each bad flag value: exit 2, one stderr line naming the flag, no run folder."""
    given = flags if "--budget" in flags else [*flags, "--budget", "1m"]
    _refused(capsys, ["--data", str(colour_dataset), *given], tmp_path / "run", needle)


def test_own_data_without_a_budget_is_refused(tmp_path, capsys, colour_dataset):
    """A user's own folder without --budget would silently mean 24 hours: exit 2, one line naming --budget and
    what to give, nothing written. The demo and a preset that sets a budget keep their own."""
    _refused(capsys, ["--data", str(colour_dataset)], tmp_path / "run", "--budget is required with your own data")
    _refused(capsys, ["--data", str(colour_dataset), "--preset", "fast"], tmp_path / "run", "--budget 10m")
    from trainer.config import parse_args

    assert parse_args(["--data", "demo"], require_budget=True).budget_s == 180.0
    assert parse_args(["--data", "x", "--preset", "paper-ours"], require_budget=True).budget_s == 24 * 3600.0
    assert parse_args(["--data", "x", "--budget", "10m"], require_budget=True).budget_s == 600.0


def test_console_script_exit_code_is_2(tmp_path):
    """`python -m trainer` in its own process exits 2 with exactly the one error line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "trainer", "--data", str(tmp_path / "nope"), "--budget", "1m", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"vit-train: error: data folder not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "run").exists()


def test_tiny_run_learns_and_stops_at_its_budget(tmp_path, colour_dataset, fake_time):
    """A 20-s run of 1-s steps: it learns the colours, stops at the last step that leaves the reserved end (the
    measured evaluation x 1.2 + 1 s), evaluates inside the budget, and writes config, metrics and summary."""
    out = tmp_path / "run"
    budget = 20.0
    assert main(["--data", str(colour_dataset), *TINY, "--budget", f"{budget:.0f}s", "--out", str(out),
                 "--log-every", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget"
    assert summary["top1"] >= 0.75  # 3 classes: chance is 1/3
    reserve = 0.1 * 1.2 + 1.0  # the measured evaluation (one val batch of 0.1 s) x 1.2, and the 1-s margin
    assert summary["train_s"] + reserve <= budget < summary["train_s"] + 1.0 + reserve  # no step more, none less
    assert summary["elapsed_s"] == pytest.approx(summary["train_s"] + 0.1)  # the final evaluation, in the reserve
    assert summary["images_seen"] == summary["steps"] * 8
    config = json.loads((out / "config.json").read_text())
    assert config["budget_s"] == budget and config["model"] == "vit_local_test_patch16"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["event"] == "train"]
    evals = [m for m in lines if m["event"] == "eval"]
    assert train and evals
    assert {"step", "epoch", "image_size", "images_per_sec", "loss", "lr", "elapsed_s"} <= train[0].keys()
    assert {"top1", "top5", "step", "epoch"} <= evals[-1].keys()
    assert evals[-1]["top1"] == pytest.approx(summary["top1"], abs=1e-4)
    # the readout's numbers: present and consistent with each other
    for before, after in zip(train, train[1:], strict=False):
        seen = after["images_seen"] - before["images_seen"]
        assert after["images_per_sec"] * after["interval_s"] == pytest.approx(seen, rel=0.01)
    assert all(0 <= t["data_wait"] <= 1 and t["tflops"] > 0 and t["mfu"] is None for t in train)  # no CPU peak
    assert train[-1]["loss"] < 0.8 * math.log(3)  # well under the loss of a uniform guess
    assert train[-1]["lr"] < 0.5 * train[0]["lr"]  # cosine-time: the lr has annealed by the end of the budget


def test_corrupt_image_ends_the_run_naming_the_file(tmp_path, capsys, fake_time):
    """A truncated JPEG in train/: exit 1, one stderr line naming the file and the prepare tool, summary.json
    with stop_reason error, and metrics.jsonl from its start event to an error event."""
    data = make_colour_dataset(tmp_path / "data", train_per_class=6, val_per_class=1)
    good = data / "train" / "a_red" / "a_red_0.JPEG"
    bad = data / "train" / "a_red" / "a_red_truncated.JPEG"
    bad.write_bytes(good.read_bytes()[:500])
    out = tmp_path / "run"
    assert main(["--data", str(data), *TINY, "--budget", "30s", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "vit-prepare" in err[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "error" and str(bad) in summary["message"]
    assert json.loads((out / "config.json").read_text())["model"] == "vit_local_test_patch16"
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "error"


def test_run_directory_must_be_new(tmp_path, capsys, colour_dataset):
    """--out holding files but no checkpoint: exit 2, "not empty"."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["--data", str(colour_dataset), "--budget", "1m", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_run_across_stages_keeps_training_and_evaluates_at_the_final_size(tmp_path, colour_dataset, fake_time):
    """32:16:2 to 64 px in a 20-s budget of 1-s steps: stages enter at epochs 0, 2 and 4, losses stay finite,
    every evaluation is at the final 64 px, and the run learns."""
    out = tmp_path / "run"
    argv = ["--data", str(colour_dataset), "--model", "vit_local_test_patch16", "--batch-size", "8", "--workers", "1",
            "--curriculum", "32:16:2", "--image-size", "64", "--budget", "20s", "--out", str(out), "--log-every", "1"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [m for m in lines if m["event"] == "stage"]
    assert [(s["stage"], s["epoch"], s["image_size"]) for s in stages] == [(0, 0, 32), (1, 2, 48), (2, 4, 64)]
    assert all(s["rebuild_s"] >= 0 for s in stages)
    evals = [m for m in lines if m["event"] == "eval"]
    assert {e["image_size"] for e in evals} == {64}
    assert {e["stage"] for e in evals} == {0, 1, 2}
    trains = [m for m in lines if m["event"] == "train"]
    assert all(math.isfinite(t["loss"]) for t in trains)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages_reached"] == 3 and summary["image_size"] == 64
    assert summary["top1"] >= 0.75  # 3 classes


def test_divergence_stops_the_run_and_names_the_last_good_checkpoint(tmp_path, capsys, colour_dataset, fake_time):
    """--lr 1e6: the first metrics line after the loss turns non-finite ends the run (exit 1) with one line naming
    the last good checkpoint and --lr, stop_reason diverged, long before the 30-s budget (1-s steps)."""
    out = tmp_path / "run"
    argv = ["--data", str(colour_dataset), *TINY, "--budget", "30s", "--out", str(out), "--lr", "1e6",
            "--log-every", "0.5", "--label-smoothing", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "ckpt-" in err and "--lr" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "diverged"
    assert summary["elapsed_s"] <= 5  # stopped within a few steps, not trained on to the budget


def test_a_finished_run_is_not_resumed(tmp_path, capsys, colour_dataset, fake_time):
    """The same command again after a run finished its budget: exit 2, "already finished"; --resume of a folder
    that is no run: exit 2."""
    out = tmp_path / "run"
    argv = ["--data", str(colour_dataset), *TINY, "--budget", "4s", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "already finished its budget" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "elsewhere")]) == 2
    assert "not a vit-train run directory" in capsys.readouterr().err


def test_profile_mode_writes_its_table_json_and_trace(tmp_path, capsys, colour_dataset):
    """--profile (no training, no budget): a row per stage size with positive rates, a bound and advice, and a
    Chrome trace that opens."""
    out = tmp_path / "prof"
    argv = ["--data", str(colour_dataset), "--model", "vit_local_test_patch16", "--batch-size", "8", "--workers", "1",
            "--image-size", "48", "--curriculum", "32:16:1", "--profile", "--profile-steps", "2", "--out", str(out),
            "--ema", "0.9"]  # the EMA copy follows the model across sizes, as in training
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pipeline img/s" in printed and "bound" in printed
    report = json.loads((out / "profile.json").read_text())
    assert [r["image_size"] for r in report["rows"]] == [32, 48]  # the plan's stage sizes
    for row in report["rows"]:
        assert row["pipeline_ips"] > 0 and row["model_ips"] > 0 and row["loop_ips"] > 0
        assert row["bound"] in ("data", "compute") and row["advice"]
    trace = json.loads((out / report["trace"]).read_text())
    assert trace["traceEvents"]  # opens in Perfetto / chrome://tracing
    assert json.loads((out / "config.json").read_text())["profile"] is True


def test_files_that_are_not_images_are_counted_at_start(tmp_path, capsys, fake_time):
    """A .csv in train/ and a .pdf in val/: one stderr line per split counting them, and the start event's
    skipped_files; the run still finishes (exit 0)."""
    data = make_colour_dataset(tmp_path / "data", train_per_class=4, val_per_class=1)
    (data / "train" / "a_red" / "labels.csv").write_text("x")
    (data / "val" / "c_blue" / "scan.pdf").write_text("x")
    out = tmp_path / "run"
    assert main(["--data", str(data), *TINY, "--budget", "4s", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 file: .csv 1" in err and "skipped 1 file: .pdf 1" in err
    start = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line)
    assert start["skipped_files"] == {"train": {".csv": 1}, "val": {".pdf": 1}}


def test_the_start_says_when_the_run_ends_and_what_a_cpu_buys(monkeypatch):
    """The plan's last lines: the clock time the budget ends, and on a CPU with a large model or image size the
    img/s and epochs its FLOPs allow there; nothing of the kind for a small model at a small size."""
    import datetime

    import torch

    from model import build_model
    from trainer import metrics
    from trainer.budget import Budget
    from trainer.config import parse_args

    class Now(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 22, 30)

    monkeypatch.setattr(metrics.datetime, "datetime", Now)
    cpu = torch.device("cpu")
    small = parse_args(["--data", "x", "--model", "vit_local_test_patch16", "--image-size", "32", "--budget", "2h"])
    net = build_model(small.model, num_classes=10, image_size=32)
    params = sum(p.numel() for p in net.parameters())
    lines = metrics.cost_lines(small, Budget(small.budget_s, clock=lambda: 0.0), cpu, net, params, 1000)
    assert lines == ["the run ends by 2026-12-07 00:30 (local time; 2h from now)"]

    big = parse_args(["--data", "x", "--model", "vit_local_test_patch16", "--image-size", "224", "--budget", "24h"])
    net = build_model(big.model, num_classes=10, image_size=224)
    [end, cost] = metrics.cost_lines(big, Budget(big.budget_s, clock=lambda: 0.0), cpu, net, params, 1000)
    assert end.startswith("the run ends by 2026-12-07 22:30")
    assert cost.startswith("vit_local_test_patch16 at 224 px on the CPU: ~") and "epochs in this budget" in cost
    assert metrics.cost_lines(big, Budget(big.budget_s, clock=lambda: 0.0), torch.device("cuda"), net, params,
                              1000) == [end]  # on a GPU: the end only
