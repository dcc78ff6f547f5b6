"""The run's configuration: one dataclass, filled from command-line flags and checked before anything is written."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model import ACTIVATIONS, LOCALITY_MODELS, MODELS
from trainer.curriculum import CurriculumPlan, PlanError
from trainer.presets import PresetError, load_preset
from trainer.schedule import SCHEDULES

PATCH_SIZE = 16
DEMO = "demo"
PAPER_CURRICULUM = "32:32:5"  # the paper's best: start at 32 px, +32 px every 5 epochs, up to --image-size
# What --data demo trains unless told otherwise: sized so a 2-core CPU crosses three curriculum stages and learns
# the demo in minutes.
DEMO_DEFAULTS = {"model": "vit_local_tiny_patch16", "image_size": 96, "curriculum": "32:32:1"}
FULL_DEFAULTS = {"model": "vit_local_small_patch16", "image_size": 224, "curriculum": PAPER_CURRICULUM}

_BUDGET_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class ConfigError(ValueError):
    """A flag's value cannot be used; the message is one line naming the flag."""


class ListPresets(Exception):  # noqa: N818  (a request, not an error)
    """--list-presets: print them and exit."""


def _parse_duration(flag: str, text: str) -> float:
    try:
        return parse_budget(text)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--budget", flag)) from None


def parse_budget(text: str) -> float:
    """'24h', '90m', '3m', '45s', '1h30m' or plain seconds ('600') -> seconds (> 0)."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _BUDGET_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ConfigError(f"--budget: cannot read {text!r}; use forms like 24h, 90m, 3m, 45s or 1h30m") from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not seconds > 0:
        raise ConfigError(f"--budget must be positive, got {text!r}")
    return seconds


@dataclass
class TrainConfig:
    data: str
    out: str | None = None
    model: str = FULL_DEFAULTS["model"]
    act: str = "hswish"
    image_size: int = FULL_DEFAULTS["image_size"]  # the final size F
    curriculum: str | None = PAPER_CURRICULUM  # None: F from the first epoch
    eval_size: int | None = None  # None: F
    batch_size: int = 64
    stage_batch: str = "fixed"
    max_batch: int = 1024
    lr: float = 1e-3  # for a batch of 512 (DeiT's rule): the peak lr is lr * batch_size / 512
    lr_schedule: str = "cosine-time"
    min_lr: float = 1e-5
    warmup_s: float = 0.0
    epochs: int | None = None  # the horizon of --lr-schedule cosine-epochs
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float | None = None  # None: the model's default
    budget_s: float = 24 * 3600.0
    device: str = "auto"
    amp: str = "auto"
    step: str = "auto"  # how the training step runs: auto | eager | graph | compile (trainer/step.py)
    workers: int = 0
    data_handoff: str = "host"  # GPU batches reach the step: host-synchronized, or ordered on the torch stream
    seed: int = 0
    eval_every: int = 1
    ckpt_every_s: float = 1800.0
    log_every_s: float = 10.0
    interp: str = "bilinear"  # resize interpolation (the paper's text: bilinear; the authors' code: bicubic)
    min_area: float = 0.08  # random-resized-crop area range [min_area, 1]
    source_ratio: float = 2.0  # read the smallest prepared copy whose shorter side is >= this x the stage size
    randaug: int = 0  # RandAugment magnitude on timm's 0..10 scale (0: off); DeiT: 9
    randaug_n: int = 2  # RandAugment operations per image
    mixup: float = 0.0  # mixup alpha (0: off); DeiT: 0.8
    cutmix: float = 0.0  # cutmix alpha (0: off); DeiT: 1.0
    mix_switch_prob: float = 0.5  # chance of cutmix rather than mixup when both are on
    reprob: float = 0.0  # random erasing probability; DeiT: 0.25
    ema: float = 0.0  # EMA decay of the weights (0: off); evaluated when on
    budget_counts: str = "all"  # "train": evaluation time is not charged to the budget (the paper's count)
    preset: str | None = None
    profile: bool = False  # --profile: measure where the time goes instead of training
    profile_sizes: str | None = None  # "32,64": default, every stage size of the plan
    profile_steps: int = 20
    preset_overrides: list[str] = field(default_factory=list)  # flags given that changed a preset's value

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 512

    def plan(self) -> CurriculumPlan:
        if self.curriculum is None:
            return CurriculumPlan.fixed(self.image_size, PATCH_SIZE)
        return CurriculumPlan.parse(self.curriculum, final=self.image_size, patch=PATCH_SIZE)

    def profile_size_list(self) -> list[int]:
        if not self.profile_sizes:
            return [s.image_size for s in self.plan().stages()]
        try:
            return [int(s) for s in str(self.profile_sizes).split(",")]
        except ValueError:
            raise ConfigError(f"--profile-sizes: expected sizes like 32,64,224, got {self.profile_sizes!r}") from None

    @property
    def final_eval_size(self) -> int:
        return self.eval_size or self.image_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2: no usage block for a single wrong flag
        self.exit(2, f"vit-train: error: {message}\n")


# Flag defaults by argparse dest; the layers above them: the demo's, then a preset's, then the flags given.
DEFAULTS: dict[str, Any] = {
    "out": None, "budget": "24h", "model": FULL_DEFAULTS["model"], "act": "hswish",
    "image_size": FULL_DEFAULTS["image_size"], "curriculum": PAPER_CURRICULUM, "no_curriculum": False,
    "eval_size": None, "batch_size": 64, "stage_batch": "fixed", "max_batch": 1024, "lr": 1e-3,
    "lr_schedule": "cosine-time", "min_lr": 1e-5, "warmup": "0", "epochs": None, "weight_decay": 0.05,
    "label_smoothing": 0.1, "drop_path": None, "device": "auto", "amp": "auto", "step": "auto", "workers": 0,
    "data_handoff": "host",
    "seed": 0, "eval_every": 1, "log_every": 10.0, "ckpt_every": "30m", "interp": "bilinear", "min_area": 0.08,
    "source_ratio": 2.0,
    "randaug": 0, "randaug_n": 2, "mixup": 0.0, "cutmix": 0.0, "mix_switch_prob": 0.5, "reprob": 0.0, "ema": 0.0,
    "budget_counts": "all", "profile": False, "profile_sizes": None, "profile_steps": 20,
}
# --data demo: sized so a 2-core CPU crosses three curriculum stages and learns the demo in minutes; lr 8e-3 for
# batch 512 is a peak lr of 1e-3 at batch 64.
DEMO_LAYER = {"model": DEMO_DEFAULTS["model"], "image_size": DEMO_DEFAULTS["image_size"],
              "curriculum": DEMO_DEFAULTS["curriculum"], "lr": 8e-3}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(prog="vit-train", description="Train a locality ViT within a wall-clock budget.",
                argument_default=argparse.SUPPRESS)
    add = p.add_argument
    add("--data", help="ImageNet-layout folder (train/<class>/*.JPEG, val/<class>/*.JPEG) or 'demo' "
                       "for the built-in generated dataset")
    add("--preset", help="a named configuration (see --list-presets); flags given override it")
    add("--list-presets", action="store_true", help="print the presets and exit")
    add("--out", help="run directory (default: runs/<timestamp>)")
    add("--budget", help=f"wall-clock budget: 24h, 90m, 3m, 45s, 1h30m (default {d['budget']})")
    add("--budget-counts", choices=("all", "train"),
        help="charge everything to the budget (all, the default) or training only (train, the paper's count)")
    add("--model", choices=MODELS,
        help=f"default {FULL_DEFAULTS['model']} ({DEMO_DEFAULTS['model']} with --data demo)")
    add("--act", choices=sorted(ACTIVATIONS), help="FFN activation of the locality models (gelu: the paper's ablation)")
    add("--image-size", type=int, help=f"final train size and eval size, a multiple of {PATCH_SIZE} (default "
                                       f"{FULL_DEFAULTS['image_size']}; {DEMO_DEFAULTS['image_size']} with demo)")
    add("--curriculum", metavar="S:M:N",
        help=f"image-size curriculum: start at S px, add M px every N epochs, up to --image-size "
             f"(default {PAPER_CURRICULUM}; {DEMO_DEFAULTS['curriculum']} with --data demo)")
    add("--no-curriculum", action="store_true", help="train at --image-size from the first epoch")
    add("--eval-size", type=int, help="evaluation size (default: --image-size)")
    add("--batch-size", type=int, help=f"default {d['batch_size']}")
    add("--stage-batch", choices=("fixed", "tokens"),
        help="tokens: scale the batch by (final/size)^2 at small stages (lr by its square root)")
    add("--max-batch", type=int, help=f"cap for --stage-batch tokens (default {d['max_batch']})")
    add("--lr", type=float, help="lr for a batch of 512, scaled by batch/512 (default 1e-3; 8e-3 with demo)")
    add("--lr-schedule", choices=SCHEDULES,
        help="time schedules anneal over the budget; cosine-epochs over --epochs (default cosine-time)")
    add("--min-lr", type=float, help=f"the schedules' floor (default {d['min_lr']})")
    add("--warmup", help="linear warm-up time, e.g. 5m (default: none, as the paper)")
    add("--epochs", type=int, help="horizon of --lr-schedule cosine-epochs")
    add("--weight-decay", type=float, help=f"AdamW weight decay, not on 1-D params (default {d['weight_decay']})")
    add("--label-smoothing", type=float, help=f"default {d['label_smoothing']}")
    add("--drop-path", type=float, help="stochastic depth rate (default: the model's)")
    add("--interp", choices=("bilinear", "bicubic"), help="resize interpolation (default bilinear)")
    add("--min-area", type=float, help="random-resized-crop minimum area fraction (default 0.08)")
    add("--source-ratio", type=float,
        help="with a dataset prepared at several --max-size copies: read, per stage, the smallest copy whose "
             "shorter side is at least this times the stage size (default 2)")
    add("--randaug", type=int, help="RandAugment magnitude 1..10 on timm's scale (default 0: off; DeiT 9)")
    add("--randaug-n", type=int, help="RandAugment operations per image (default 2)")
    add("--mixup", type=float, help="mixup alpha (default 0: off; DeiT 0.8)")
    add("--cutmix", type=float, help="cutmix alpha (default 0: off; DeiT 1.0)")
    add("--mix-switch-prob", type=float, help="chance of cutmix instead of mixup when both are on (default 0.5)")
    add("--reprob", type=float, help="random erasing probability (default 0: off; DeiT 0.25)")
    add("--ema", type=float, help="EMA decay of the weights, evaluated when on (default 0: off)")
    add("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    add("--amp", choices=("auto", "bf16", "fp16", "off"),
        help="autocast dtype on CUDA (auto: bf16 where supported, else fp16 + grad scaler); CPU: off")
    add("--step", choices=("auto", "eager", "graph", "compile"),
        help="how each training step runs: graph captures the whole step in one CUDA graph per stage (bf16 or "
             "fp32 on CUDA), compile uses torch.compile, eager runs it op by op (auto: graph on CUDA unless "
             "--amp fp16, else eager)")
    add("--compile", dest="step", action="store_const", const="compile", help="same as --step compile")
    add("--workers", type=int, help="DALI CPU threads (default 0: one per core)")
    add("--data-handoff", choices=("host", "stream"),
        help="GPU batches: host waits on the host for each decoded batch (default); stream makes the training "
             "stream wait for it on the device, so the host never blocks on GPU work")
    add("--seed", type=int, help="default 0")
    add("--eval-every", type=int, help="evaluate every K epochs (0: only at the end; default 1)")
    add("--log-every", type=float, help="seconds between metrics lines (default 10)")
    add("--ckpt-every", help="checkpoint period (also at each stage change and the end; default 30m)")
    add("--profile", action="store_true",
        help="instead of training: time the pipeline alone, the model step alone and the full loop at each stage "
             "size, print a table, write profile.json and a torch.profiler trace")
    add("--profile-sizes", help="comma-separated sizes for --profile (default: the plan's stage sizes)")
    add("--profile-steps", type=int, help="timed steps per measurement for --profile (default 20)")
    add("--resume", metavar="RUN_DIR",
        help="continue RUN_DIR from its newest readable checkpoint, with its own configuration")
    return p


def load_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run directory was started with (its config.json), pointed at that directory."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{run_dir} is not a vit-train run directory (no readable config.json)") from None
    names = {f.name for f in fields(TrainConfig)}
    if saved.get("compile") and "step" not in saved:  # written before --step existed
        saved["step"] = "compile"
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.out = str(run_dir)
    return cfg


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check flags. Raises ConfigError (argparse's own errors exit 2 directly).

    Layers, each over the one before: the defaults, the demo's (with ``--data demo``), a preset's, the flags
    given. With ``--resume RUN_DIR`` the run's own saved configuration is returned (other flags are ignored).
    """
    given = vars(build_parser().parse_args(argv))
    if given.get("list_presets"):
        raise ListPresets()
    if "resume" in given:
        return load_run_config(Path(given["resume"]))
    if "data" not in given:
        raise ConfigError("--data is required (an ImageNet-layout folder or 'demo'), or --resume RUN_DIR")
    raw = dict(DEFAULTS)
    if given["data"] == DEMO:
        raw.update(DEMO_LAYER)
    overrides: list[str] = []
    if "preset" in given:
        try:
            preset = load_preset(given["preset"])
        except PresetError as e:
            raise ConfigError(str(e)) from None
        raw.update(preset)
        overrides = [f"--{k.replace('_', '-')} {given[k]} (preset: {preset[k]})"
                     for k in sorted(given) if k in preset and given[k] != preset[k]]
    raw.update(given)
    cfg = _build(raw)
    cfg.preset_overrides = overrides
    return cfg


def _build(raw: dict[str, Any]) -> TrainConfig:
    r = raw
    cfg = TrainConfig(
        data=r["data"], out=r["out"], model=r["model"], act=r["act"], image_size=r["image_size"],
        curriculum=None if r["no_curriculum"] else r["curriculum"], eval_size=r["eval_size"],
        batch_size=r["batch_size"], stage_batch=r["stage_batch"], max_batch=r["max_batch"], lr=r["lr"],
        weight_decay=r["weight_decay"], label_smoothing=r["label_smoothing"], drop_path=r["drop_path"],
        lr_schedule=r["lr_schedule"], min_lr=r["min_lr"], epochs=r["epochs"],
        warmup_s=0.0 if str(r["warmup"]).strip() in ("0", "none") else _parse_duration("--warmup", str(r["warmup"])),
        budget_s=parse_budget(str(r["budget"])), device=r["device"], amp=r["amp"], step=r["step"],
        workers=r["workers"], data_handoff=r["data_handoff"], seed=r["seed"], eval_every=r["eval_every"],
        log_every_s=r["log_every"],
        ckpt_every_s=_parse_duration("--ckpt-every", str(r["ckpt_every"])), interp=r["interp"],
        min_area=r["min_area"], source_ratio=r["source_ratio"], randaug=r["randaug"], randaug_n=r["randaug_n"],
        mixup=r["mixup"], cutmix=r["cutmix"], mix_switch_prob=r["mix_switch_prob"], reprob=r["reprob"], ema=r["ema"],
        budget_counts=r["budget_counts"], preset=r.get("preset"), profile=r["profile"],
        profile_sizes=r["profile_sizes"], profile_steps=r["profile_steps"],
    )
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if cfg.image_size <= 0 or cfg.image_size % PATCH_SIZE:
        raise ConfigError(
            f"--image-size must be a positive multiple of the patch size {PATCH_SIZE}, got {cfg.image_size}"
        )
    if cfg.eval_size is not None and (cfg.eval_size <= 0 or cfg.eval_size % PATCH_SIZE):
        raise ConfigError(
            f"--eval-size must be a positive multiple of the patch size {PATCH_SIZE}, got {cfg.eval_size}"
        )
    try:
        cfg.plan()
    except PlanError as e:
        raise ConfigError(str(e)) from None
    for flag, value in (("--batch-size", cfg.batch_size), ("--lr", cfg.lr), ("--max-batch", cfg.max_batch)):
        if not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    for flag, value in (("--workers", cfg.workers), ("--eval-every", cfg.eval_every),
                        ("--weight-decay", cfg.weight_decay)):
        if value < 0:
            raise ConfigError(f"{flag} must not be negative, got {value}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise ConfigError(f"--drop-path must lie in [0, 1), got {cfg.drop_path}")
    if cfg.lr_schedule == "cosine-epochs" and not (cfg.epochs and cfg.epochs > 0):
        raise ConfigError("--lr-schedule cosine-epochs needs --epochs N (a positive number of epochs)")
    if not 0 <= cfg.min_lr <= cfg.peak_lr:
        raise ConfigError(f"--min-lr must lie in [0, the peak lr {cfg.peak_lr:g}], got {cfg.min_lr}")
    if cfg.warmup_s >= cfg.budget_s:
        raise ConfigError(f"--warmup ({cfg.warmup_s:.0f}s) must be shorter than --budget ({cfg.budget_s:.0f}s)")
    if cfg.act != "hswish" and cfg.model not in LOCALITY_MODELS:
        raise ConfigError(f"--act {cfg.act} applies to the locality models ({', '.join(LOCALITY_MODELS)}), "
                          f"not {cfg.model}")
    if not cfg.log_every_s > 0:
        raise ConfigError(f"--log-every must be positive, got {cfg.log_every_s}")
    if not 0 <= cfg.randaug <= 10 or cfg.randaug_n < 1:
        raise ConfigError(
            f"--randaug must lie in 0..10 and --randaug-n be positive, got {cfg.randaug}, {cfg.randaug_n}")
    for flag, value in (("--reprob", cfg.reprob), ("--mix-switch-prob", cfg.mix_switch_prob)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag} must lie in [0, 1], got {value}")
    for flag, value in (("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix)):
        if value < 0:
            raise ConfigError(f"{flag} must not be negative, got {value}")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise ConfigError(
            f"--mixup/--cutmix pair images within a batch: --batch-size must be even, got {cfg.batch_size}")
    if not 0 < cfg.min_area <= 1:
        raise ConfigError(f"--min-area must lie in (0, 1], got {cfg.min_area}")
    if cfg.source_ratio < 1:
        raise ConfigError(f"--source-ratio must be at least 1 (a copy smaller than the stage would be upsampled), "
                          f"got {cfg.source_ratio}")
    if cfg.profile_steps < 1:
        raise ConfigError(f"--profile-steps must be positive, got {cfg.profile_steps}")
    for size in cfg.profile_size_list():
        if size <= 0 or size % PATCH_SIZE:
            raise ConfigError(f"--profile-sizes: {size} is not a positive multiple of the patch size {PATCH_SIZE}")
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"--ema must lie in [0, 1), got {cfg.ema}")
