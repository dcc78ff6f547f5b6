"""The run's own decisions (trainer/decide.py) are made on a slice held out from the training split, never on val/:
the slice is stratified, disjoint from what trains and the same on every start; the final evaluation's size is the
slice's choice, recorded with why; explicit flags override it; and poisoning val/'s labels changes no decision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import trainer.decide
from pipelines import Split
from tests.conftest import CLASS_COLOURS, make_colour_dataset
from trainer.cli import main
from trainer.config import parse_args
from trainer.decide import HOLDOUT_MAX, HOLDOUT_MIN, candidates, choose, hold_out

TINY = ["--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "8", "--workers", "1",
        "--budget", "30s", "--eval-every", "0", "--log-every", "1000"]


def _split(counts: list[int]) -> Split:
    labels = tuple(label for label, n in enumerate(counts) for _ in range(n))
    files = tuple(f"/data/train/c{label}/{i}.JPEG" for i, label in enumerate(labels))
    return Split(root=Path("/data/train"), files=files, labels=labels,
                 classes=tuple(f"c{k}" for k in range(len(counts))))


def _cfg(*flags: str):
    return parse_args(["--data", "x", *flags])


def test_the_slice_is_stratified_disjoint_and_the_same_on_every_start():
    split = _split([4000, 1500, 500])  # imbalanced: 6,000 images
    held = hold_out(_cfg(), split)
    assert held.slice is not None and len(held.slice) == 300  # 5%
    assert len(held.train) + len(held.slice) == len(split)
    assert not set(held.train.files) & set(held.slice.files)
    assert set(held.train.files) | set(held.slice.files) == set(split.files)
    for label, share in enumerate((4000, 1500, 500)):  # every class in proportion
        assert held.slice.labels.count(label) == round(300 * share / 6000)
    for part in (held.train, held.slice):  # labels still name their files' classes
        assert all(f"/c{label}/" in f for f, label in zip(part.files, part.labels, strict=True))
    assert hold_out(_cfg(), split).slice == held.slice  # a resume, another rank: the same files
    assert hold_out(_cfg("--seed", "1"), split).slice != held.slice
    assert held.record() == {"images": 300, "why": held.why} and "never trained on" in held.why


def test_the_slice_is_capped_and_needs_enough_images():
    assert len(hold_out(_cfg(), _split([50_000, 50_000])).slice) == HOLDOUT_MAX
    small = hold_out(_cfg(), _split([1000, 900]))  # 5% would be 95 images
    assert small.slice is None and len(small.train) == 1900
    assert f"under the {HOLDOUT_MIN}" in small.why


@pytest.mark.parametrize(("flags", "needle"), [(["--eval-size", "48"], "--eval-size 48 given"),
                                               (["--holdout", "0"], "--holdout 0")])
def test_explicit_flags_hold_nothing_out(flags, needle):
    split = _split([4000, 2000])
    held = hold_out(_cfg(*flags), split)
    assert held.slice is None and held.train == split and needle in held.why


def test_a_budget_of_minutes_holds_nothing_out():
    split = _split([4000, 2000])
    held = hold_out(_cfg("--budget", "30m"), split)
    assert held.slice is None and held.train == split and "a budget under 1h" in held.why
    assert hold_out(_cfg("--budget", "1h"), split).slice is not None


def test_webdataset_shards_hold_nothing_out():
    split = _split([4000, 2000])
    split = Split(split.root, split.files, split.labels, split.classes, shards=(("a.tar", "a.idx"),))
    assert hold_out(_cfg(), split).slice is None


def test_the_training_size_stays_unless_another_wins_by_two_images():
    assert candidates(64, 16) == [64, 80, 96, 128]
    n = 300
    assert choose({64: 0.50, 80: 0.50, 96: 0.49, 128: 0.4}, 64, n)[0] == 64  # a tie keeps the training size
    assert choose({64: 0.50, 80: 0.50 + 1 / n, 96: 0.49, 128: 0.4}, 64, n)[0] == 64  # one image is noise
    size, why = choose({64: 0.50, 80: 0.50 + 2 / n, 96: 0.50 + 3 / n, 128: 0.4}, 64, n)
    assert size == 96 and "3 more of 300" in why
    assert choose({64: 0.6, 80: 0.5, 96: 0.5, 128: 0.5}, 64, n)[0] == 64


def test_hold_out_rejects_a_share_out_of_range(capsys, tmp_path):
    assert main(["--data", "x", "--budget", "1m", "--holdout", "0.6", "--out", str(tmp_path / "run")]) == 2
    assert "--holdout must lie in [0, 0.5)" in capsys.readouterr().err


def _poison(data: Path, to: Path) -> Path:
    """A copy of ``data`` whose val/ labels are all wrong: each class's images moved to the next class's folder."""
    shutil.copytree(data, to)
    names = sorted(CLASS_COLOURS)
    for name in names:
        shutil.move(to / "val" / name, to / "val" / f"{name}.old")
    for i, name in enumerate(names):
        shutil.move(to / "val" / f"{name}.old", to / "val" / names[(i + 1) % len(names)])
    return to


def _events(run: Path, name: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == name]


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(trainer.decide, "HOLDOUT_MIN", 10)  # the tiny set's slice is 24 images
    monkeypatch.setattr(trainer.decide, "HOLDOUT_MIN_BUDGET_S", 10.0)  # in a 30-s budget


def test_poisoned_val_labels_change_no_decision(tmp_path, fake_time, small_slices):
    data = make_colour_dataset(tmp_path / "data", train_per_class=40, val_per_class=4)
    poisoned = _poison(data, tmp_path / "poisoned")
    runs = {}
    for name, folder in (("clean", data), ("poisoned", poisoned)):
        out = tmp_path / f"run-{name}"
        assert main(["--data", str(folder), *TINY, "--holdout", "0.2", "--out", str(out)]) == 0
        runs[name] = (json.loads((out / "summary.json").read_text()), _events(out, "eval_size"),
                      _events(out, "start")[0])
    (clean, [clean_choice], start), (bad, [bad_choice], _) = runs["clean"], runs["poisoned"]
    assert start["train_images"] == 96 and start["decisions"]["holdout"]["images"] == 24
    assert start["eval_size"] == "auto"
    assert set(clean_choice["holdout_top1"]) == {"32", "48", "64", "96"} and clean_choice["images"] == 24
    # the val labels were wrong, and the runs saw it there ...
    assert clean["top1"] >= 0.75 and bad["top1"] < 0.5
    # ... and nowhere else: the same slice scores, the same size, the same record
    drop = {"elapsed_s"}
    assert {k: v for k, v in clean_choice.items() if k not in drop} == \
        {k: v for k, v in bad_choice.items() if k not in drop}
    assert clean["decisions"] == bad["decisions"] and clean["eval_size"] == bad["eval_size"]
    assert clean["eval_size"] == clean_choice["chosen"] and clean["image_size"] == 32
    evals = _events(tmp_path / "run-clean", "eval")
    assert evals[-1]["image_size"] == clean["eval_size"]  # val was evaluated once, at the chosen size


def test_explicit_eval_size_trains_on_everything_and_is_kept(tmp_path, colour_dataset, fake_time, small_slices):
    out = tmp_path / "run"
    assert main(["--data", str(colour_dataset), *TINY, "--eval-size", "48", "--holdout", "0.2",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_size"] == 48 and summary["image_size"] == 32
    assert summary["decisions"]["holdout"]["images"] == 0
    assert "--eval-size 48 given" in summary["decisions"]["eval_size"]["why"]
    [start] = _events(out, "start")
    assert start["train_images"] == 24 and start["eval_size"] == 48
    assert _events(out, "eval")[-1]["image_size"] == 48
    # what the tools after training read: vit-eval's default size, the report's column
    from trainer.report import load_run, run_table
    from trainer.use import open_run

    assert open_run(out).eval_size == 48
    assert load_run(out).sizes == "32 → 48" and "| 32 → 48 |" in run_table([load_run(out)])
