"""The training recipe: presets, DeiT's augmentations, weight-decay groups, the lr rule."""

from __future__ import annotations

import pytest
import torch

from model import build_model
from pipelines import IMAGENET_MEAN, IMAGENET_STD, StageLoader, StageSpec, index_dataset
from tests.conftest import CLASS_COLOURS
from trainer.augment import BatchAugment
from trainer.config import ConfigError, parse_args
from trainer.presets import preset_names
from trainer.step import weight_decay_groups

RECIPE = dict(randaug=9, mixup=0.8, cutmix=1.0, reprob=0.25, interp="bicubic", budget_counts="train",
              lr_schedule="cosine-epochs", epochs=300, batch_size=64, lr=1e-3, weight_decay=0.05,
              label_smoothing=0.1, drop_path=0.1, budget_s=86400.0, image_size=224, eval_every=1)
PRESETS = {
    "paper-ours": dict(model="vit_local_small_patch16", act="hswish", curriculum="32:32:5", **RECIPE),
    "paper-ours-fixed-size": dict(model="vit_local_small_patch16", act="hswish", curriculum=None, **RECIPE),
    "paper-ours-gelu": dict(model="vit_local_small_patch16", act="gelu", curriculum="32:32:5", **RECIPE),
    "paper-deit-s": dict(model="deit_small_patch16_224", act="hswish", curriculum=None, **RECIPE),
    "paper-localvit-s": dict(model="localvit_small_patch16", act="hswish", curriculum=None, **RECIPE),
    "fast": dict(model="vit_local_small_patch16", curriculum="32:32:5", lr_schedule="cosine-time", lr=4e-3,
                 randaug=5, mixup=0.0, cutmix=0.0, reprob=0.0, budget_counts="all", min_area=0.25),
}


def test_every_preset_file_is_in_the_table():
    """The presets folder and this file's table name the same presets."""
    assert sorted(PRESETS) == preset_names()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_resolves_to_its_documented_config(name):
    """Each preset sets exactly the recipe values in the table, and reports no overrides."""
    cfg = parse_args(["--data", "/data/imagenet", "--preset", name])
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value, key
    assert cfg.preset == name and cfg.preset_overrides == []


def test_flags_override_a_preset_and_are_reported():
    """A flag given with --preset wins, and each override is listed with the preset's own value."""
    cfg = parse_args(["--data", "demo", "--preset", "paper-ours", "--budget", "3m", "--image-size", "64"])
    assert cfg.budget_s == 180 and cfg.image_size == 64 and cfg.model == "vit_local_small_patch16"
    assert cfg.preset_overrides == ["--budget 3m (preset: 24h)", "--image-size 64 (preset: 224)"]


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose from fast, paper-deit-s"):
        parse_args(["--data", "x", "--preset", "nope"])


def test_effective_lr_is_base_times_batch_over_512():
    """peak_lr = --lr x batch / 512 (DeiT's rule)."""
    assert parse_args(["--data", "x", "--lr", "1e-3", "--batch-size", "64"]).peak_lr == pytest.approx(1.25e-4)
    assert parse_args(["--data", "x", "--lr", "1e-3", "--batch-size", "1024"]).peak_lr == pytest.approx(2e-3)
    assert parse_args(["--data", "demo"]).peak_lr == pytest.approx(1e-3)  # the demo's lr 8e-3 at batch 64


def test_weight_decay_skips_exactly_1d_params_position_embedding_and_class_token():
    net = build_model("vit_local_test_patch16", num_classes=5)
    groups = weight_decay_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    expected = {n for n, p in net.named_parameters() if p.ndim <= 1} | {"pos_embed", "cls_token"}
    assert no_decay == expected
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay and not decay & no_decay and all(net.get_parameter(n).ndim > 1 for n in decay)


def _colour_distance(images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> torch.Tensor:
    pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    nominal = torch.tensor([CLASS_COLOURS[classes[int(i)]] for i in labels], dtype=torch.float32) / 255
    return (pixels.mean(dim=(2, 3)) - nominal).abs().max(dim=1).values


def test_randaugment_runs_on_the_cpu_and_changes_images(colour_dataset):
    """DALI's RandAugment on the CPU: plain crops keep each image's colour, RandAugment moves at least 3 of 24."""
    train, _ = index_dataset(colour_dataset)
    distances = {}
    for ra in (None, (2, 27)):
        spec = StageSpec(image_size=32, batch_size=24, num_threads=1, rand_augment=ra, interp="cubic")
        images, labels = next(iter(StageLoader(train, spec, train=True, device=torch.device("cpu"))))
        assert images.shape == (24, 3, 32, 32)
        distances[ra] = _colour_distance(images, labels, train.classes)
    assert distances[None].max() < 0.15  # plain crops keep each image's colour
    assert (distances[(2, 27)] > 0.15).sum() >= 3  # RandAugment's colour and geometry ops move it


def test_mixup_cutmix_targets_are_distributions_and_smoothing_matches_when_off():
    """Mixed targets sum to 1 per image; without mixing, images and labels pass unchanged and the loss smooths
    labels as the unmixed soft target would (0.9 + 0.1/10 on the label)."""
    cfg = parse_args(["--data", "x", "--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1"])
    augment = BatchAugment(cfg, num_classes=10, device=torch.device("cpu"))
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    for _ in range(5):
        _, targets = augment(images.clone(), labels)
        assert targets.shape == (8, 10)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    no_mix = BatchAugment(parse_args(["--data", "x", "--label-smoothing", "0.1"]), 10, torch.device("cpu"))
    out, targets = no_mix(images.clone(), labels)
    assert torch.equal(targets, labels) and torch.equal(out, images)
    assert no_mix.criterion.label_smoothing == 0.1
    # with the mixing weight at 1 (no mixing), the soft target is exactly the label-smoothed one-hot
    hard = augment.mix.__class__(mixup_alpha=0.0, cutmix_alpha=0.0, prob=0.0, label_smoothing=0.1, num_classes=10)
    _, t = hard(images.clone(), labels)
    assert t.max(dim=1).values.allclose(torch.tensor(0.9 + 0.1 / 10)) and t.min().item() == pytest.approx(0.01)


def test_random_erasing_touches_about_its_probability_of_images():
    """--reprob 0.25 erases something in 15-35% of 400 images."""
    cfg = parse_args(["--data", "x", "--reprob", "0.25"])
    augment = BatchAugment(cfg, num_classes=10, device=torch.device("cpu"))
    torch.manual_seed(0)
    images = torch.zeros(400, 3, 16, 16)
    out, _ = augment(images, torch.zeros(400, dtype=torch.long))
    touched = (out.flatten(1) != 0).any(dim=1).float().mean().item()
    assert 0.15 < touched < 0.35


def test_uncharged_time_is_not_counted():
    """Time inside budget.uncharged(True) is not in elapsed; inside uncharged(False) it is."""
    from trainer.budget import Budget

    now = [0.0]
    budget = Budget(100, clock=lambda: now[0])
    now[0] = 10.0
    with budget.uncharged(True):  # --budget-counts train: an evaluation
        now[0] = 40.0
    assert budget.elapsed == 10.0
    with budget.uncharged(False):  # --budget-counts all
        now[0] = 50.0
    assert budget.elapsed == 20.0


def test_list_presets_prints_one_line_each(capsys):
    """--list-presets: exit 0, one line per preset, in the presets' order."""
    from trainer.cli import main

    assert main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == preset_names()


def test_ema_weights_are_evaluated_and_checkpointed(tmp_path, colour_dataset, fake_time):
    """--ema 0.9 with DeiT's augmentations, an 8-s run of 1-s steps: the checkpoint holds an EMA copy of every
    weight, averaged (not the model's), and model.safetensors is that copy."""
    from trainer.checkpoint import list_checkpoints, load_checkpoint
    from trainer.cli import main

    out = tmp_path / "run"
    argv = ["--data", str(colour_dataset), "--model", "vit_local_test_patch16", "--image-size", "48",
            "--no-curriculum", "--batch-size", "8", "--workers", "1", "--budget", "8s", "--out", str(out),
            "--ema", "0.9", "--warmup", "0",
            "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--randaug", "5"]
    assert main(argv) == 0  # the EMA across a stage change: tests/test_trainer.py, on a fake clock
    payload = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert set(payload["ema"]) == set(payload["model"])
    assert payload["ema"]["pos_embed"].shape == payload["model"]["pos_embed"].shape == (1, 1 + 9, 96)
    assert not torch.equal(payload["ema"]["head.weight"], payload["model"]["head.weight"])
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["head.weight"], payload["ema"]["head.weight"])  # the EMA is what was kept
