"""Flag parsing, presets and the CLI page; the Budget's reserved end."""

from __future__ import annotations

import pytest

from trainer.budget import Budget
from trainer.config import DEMO_LAYER, ConfigError, parse_args, parse_budget


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("90m", 5400), ("3m", 180), ("45s", 45),
                                               ("1h30m", 5400), ("600", 600), ("1.5h", 5400), ("1d", 86400)])
def test_budget_forms(text, seconds):
    """Each --budget form parses to its seconds."""
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "3 minutes", "0", "-5m", "m", "3m3"])
def test_bad_budgets_are_refused(text):
    """Empty, zero, negative, unitless words and trailing garbage raise a ConfigError naming --budget."""
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


def test_demo_gets_cpu_sized_data_defaults_unless_overridden():
    """--data demo gets the demo's model and image size, a folder the full-size defaults; a flag overrides both."""
    demo = parse_args(["--data", "demo"])
    assert (demo.model, demo.image_size) == (DEMO_LAYER["model"], DEMO_LAYER["image_size"])
    full = parse_args(["--data", "/some/imagenet"])
    assert (full.model, full.image_size, full.batch_size) == ("vit_local_small_patch16", 224, 64)
    assert full.plan().stages()[-1].image_size == 224
    assert parse_args(["--data", "demo", "--image-size", "128"]).image_size == 128
    fixed = parse_args(["--data", "demo", "--no-curriculum"]).plan().stages()
    assert [s.image_size for s in fixed] == [DEMO_LAYER["image_size"]]


def test_one_default_recipe_for_the_demo_and_any_folder():
    """Peak lr, warm-up, schedule and curriculum do not depend on where the data comes from."""
    recipe = ("lr", "peak_lr", "warmup", "warmup_fraction", "lr_schedule", "min_lr", "curriculum")
    demo, folder = parse_args(["--data", "demo"]), parse_args(["--data", "/some/folder"])
    assert not set(DEMO_LAYER) & set(recipe)
    assert [getattr(demo, k) for k in recipe] == [getattr(folder, k) for k in recipe]
    assert folder.peak_lr == pytest.approx(1e-3) and folder.warmup_fraction == pytest.approx(0.05)


def test_the_auto_curriculum_is_placed_in_time_on_cuda_and_fixed_on_the_cpu():
    """--curriculum auto resolves once, at parse time: the time-placed default on CUDA, none on the CPU."""
    from trainer.config import DEFAULT_CURRICULUM, auto_curriculum

    assert auto_curriculum("cuda") == DEFAULT_CURRICULUM and auto_curriculum("cpu") is None
    plan = parse_args(["--data", "x", "--curriculum", DEFAULT_CURRICULUM]).plan()
    assert plan.timed and [s.image_size for s in plan.stages()] == [32, 64, 96, 128, 160, 192, 224]
    assert parse_args(["--data", "x", "--device", "cpu"]).curriculum is None  # resolved once: config.json keeps it
    assert parse_args(["--data", "x", "--device", "cpu", "--curriculum", "auto"]).curriculum is None
    assert parse_args(["--data", "x", "--curriculum", "32:32:5"]).curriculum == "32:32:5"


@pytest.mark.parametrize("name", ["paper-ours", "paper-ours-fixed-size", "paper-ours-gelu", "paper-deit-s",
                                  "paper-localvit-s"])
def test_paper_presets_pin_their_recipe_so_the_defaults_never_leak_in(name):
    """Each paper preset sets every recipe key itself: no warm-up, DeiT's peak lr at batch 64."""
    from trainer.presets import load_preset

    preset = load_preset(name)
    for key in ("model", "image_size", "curriculum", "lr", "lr_schedule", "min_lr", "warmup", "batch_size"):
        assert key in preset, f"{name} does not set {key}"
    cfg = parse_args(["--data", "x", "--preset", name])
    assert cfg.warmup_fraction == 0 and cfg.peak_lr == pytest.approx(1.25e-4)


@pytest.mark.parametrize(("text", "canonical", "fraction"), [("5%", "5%", 0.05), ("0", "0", 0.0),
                                                             ("none", "0", 0.0), ("6m", "6m", 0.1),
                                                             ("360", "6m", 0.1), ("2.5%", "2.5%", 0.025)])
def test_warmup_is_a_time_or_a_share_of_the_budget(text, canonical, fraction):
    """--warmup as a share, a time or none: its canonical text and its fraction of a 1-h budget."""
    cfg = parse_args(["--data", "x", "--budget", "1h", "--warmup", text])
    assert cfg.warmup == canonical and cfg.warmup_fraction == pytest.approx(fraction)


def test_a_step_that_would_eat_the_reserved_end_is_not_started():
    """can_start(s) holds exactly while elapsed + s + reserve_s <= the budget."""
    now = [0.0]
    budget = Budget(100, clock=lambda: now[0])
    budget.reserve_s = 10.0
    now[0] = 85.0
    assert budget.can_start(5.0)  # 85 + 5 + 10 = 100
    assert not budget.can_start(5.5)
    budget.reserve_s = 2.0
    assert budget.can_start(13.0) and not budget.can_start(13.5)


def test_reserve_follows_the_measured_evaluation():
    """end_reserve uses the measured evaluation over the estimate, never less than it, plus the checkpoint write."""
    from trainer.budget import end_reserve

    estimate = end_reserve(None, estimated_eval_s=10.0)
    grown = end_reserve(30.0, estimated_eval_s=10.0)  # a slower evaluation than estimated
    shrunk = end_reserve(2.0, estimated_eval_s=10.0)
    assert shrunk < estimate < grown
    assert grown >= 30.0 and shrunk >= 2.0  # never less than the measured evaluation itself
    assert end_reserve(2.0, 0.0, checkpoint_s=5.0) >= 7.0  # the final checkpoint's write is reserved too


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--lr-schedule", "cosine-epochs"], "needs --epochs"),
        (["--min-lr", "0.1"], "--min-lr must lie in"),
        (["--warmup", "2h", "--budget", "1h"], "--warmup (2h) must be shorter than --budget (1h)"),
        (["--warmup", "soon"], "--warmup: cannot read"),
        (["--warmup", "100%"], "--warmup must be a share in (0%, 100%)"),
        (["--warmup", "x%"], "--warmup: cannot read 'x%'"),
    ],
)
def test_schedule_flags_are_checked(flags, needle):
    """Each inconsistent schedule flag raises a ConfigError with its message."""
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_args(["--data", "x", *flags])


def test_defaults_and_help_come_from_one_declaration():
    """parse_args' defaults equal TrainConfig's, and --help lists every flag with its default."""
    from dataclasses import fields

    from trainer.config import TrainConfig, build_parser, flag_name

    parsed = parse_args(["--data", "x"])
    declared = TrainConfig(data="x")
    assert all(getattr(parsed, f.name) == getattr(declared, f.name) for f in fields(TrainConfig))
    text = " ".join(build_parser().format_help().split())
    for f in fields(TrainConfig):
        if f.metadata.get("flag") is False:
            continue
        assert flag_name(f) in text
    assert "--budget BUDGET wall-clock budget" in text and "(default: 24h; 3m with --data demo)" in text
    assert "(default: 224; 96 with --data demo)" in text


def test_a_preset_file_with_an_unknown_key_is_refused(tmp_path, monkeypatch, capsys):
    """A preset file's unknown key: exit 2, one line naming the key and the file, no run folder; a bad value in a
    preset names its flag."""
    import trainer.presets as presets
    from trainer.cli import main

    (tmp_path / "mine.yaml").write_text("description: x\nmodel: vit_local_test_patch16\nlearning_rate: 0.1\n")
    monkeypatch.setattr(presets, "FOLDER", tmp_path)
    out = tmp_path / "run"
    assert main(["--data", "demo", "--preset", "mine", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'learning_rate'" in err and "mine.yaml" in err and len(err.splitlines()) == 1
    assert not out.exists()
    (tmp_path / "mine.yaml").write_text("model: vit_local_test_patch16\nbudget: soon\n")
    with pytest.raises(ConfigError, match="--budget: cannot read 'soon'"):
        parse_args(["--data", "x", "--preset", "mine"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    """--device cuda where there is none: exit 2, one line naming the flag, no run folder."""
    from trainer.cli import main

    out = tmp_path / "run"
    assert main(["--data", "demo", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit-train: error: --device cuda") and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_flag_value_of_the_wrong_type_names_the_flag():
    """--batch-size many: a ConfigError naming the flag and the value."""
    with pytest.raises(ConfigError, match="--batch-size: cannot read 'many'"):
        parse_args(["--data", "x", "--batch-size", "many"])


def test_the_cli_page_lists_every_flag_with_its_declared_default():
    """docs/cli.md has a row for every flag, showing the declared default."""
    import re
    from dataclasses import fields
    from pathlib import Path

    from trainer.config import TrainConfig, flag_name

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+?) \|", page, re.M))
    for f in fields(TrainConfig):
        if f.metadata.get("flag") is False:
            continue
        flag = flag_name(f)
        assert flag in rows, f"docs/cli.md lacks {flag}"
        if f.default is not None and not f.metadata.get("action"):
            shown = f.metadata["show"](f.default) if f.metadata.get("show") else f.default
            documented = rows[flag].split(" (`--data demo`")[0]
            if isinstance(shown, float):
                assert float(documented) == shown, flag
            else:
                assert documented == str(shown), flag
