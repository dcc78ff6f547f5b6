"""The run's configuration: one dataclass, filled from command-line flags and checked before anything is written."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from model import ACTIVATIONS, LOCALITY_MODELS, MODELS
from trainer.curriculum import CurriculumPlan, PlanError
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
    lr: float = 1e-3
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
    compile: bool = False
    workers: int = 0
    seed: int = 0
    eval_every: int = 1
    ckpt_every_s: float = 1800.0
    log_every_s: float = 10.0

    def plan(self) -> CurriculumPlan:
        if self.curriculum is None:
            return CurriculumPlan.fixed(self.image_size, PATCH_SIZE)
        return CurriculumPlan.parse(self.curriculum, final=self.image_size, patch=PATCH_SIZE)

    @property
    def final_eval_size(self) -> int:
        return self.eval_size or self.image_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2: no usage block for a single wrong flag
        self.exit(2, f"vit-train: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vit-train", description="Train a locality ViT within a wall-clock budget.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="ImageNet-layout folder (train/<class>/*.JPEG, val/<class>/*.JPEG) or 'demo' "
                        "for the built-in generated dataset")
    p.add_argument("--out", default=None, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--budget", default="24h", help="wall-clock budget: 24h, 90m, 3m, 45s, 1h30m")
    p.add_argument("--model", default=None, choices=MODELS,
                   help=f"default {FULL_DEFAULTS['model']} ({DEMO_DEFAULTS['model']} with --data demo)")
    p.add_argument("--act", default="hswish", choices=sorted(ACTIVATIONS),
                   help="FFN activation of the locality models (gelu: the paper's ablation)")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"final train size and eval size, a multiple of {PATCH_SIZE} (default "
                        f"{FULL_DEFAULTS['image_size']}; {DEMO_DEFAULTS['image_size']} with --data demo)")
    p.add_argument("--curriculum", default=None, metavar="S:M:N",
                   help=f"image-size curriculum: start at S px, add M px every N epochs, up to --image-size "
                        f"(default {PAPER_CURRICULUM}; {DEMO_DEFAULTS['curriculum']} with --data demo)")
    p.add_argument("--no-curriculum", action="store_true", help="train at --image-size from the first epoch")
    p.add_argument("--eval-size", type=int, default=None, help="evaluation size (default: --image-size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stage-batch", default="fixed", choices=("fixed", "tokens"),
                   help="tokens: scale the batch by (final/size)^2 at small stages (lr by its square root)")
    p.add_argument("--max-batch", type=int, default=1024, help="cap for --stage-batch tokens")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="cosine-time", choices=SCHEDULES,
                   help="time schedules anneal over the budget; cosine-epochs over --epochs")
    p.add_argument("--min-lr", type=float, default=1e-5, help="the schedules' floor")
    p.add_argument("--warmup", default="0", help="linear warm-up time, e.g. 5m (default: none, as the paper)")
    p.add_argument("--epochs", type=int, default=None, help="horizon of --lr-schedule cosine-epochs")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast dtype on CUDA (auto: bf16 where supported, else fp16 + grad scaler); CPU: off")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--workers", type=int, default=0, help="DALI CPU threads (0: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every K epochs (0: only at the end)")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between metrics lines")
    p.add_argument("--ckpt-every", default="30m", help="checkpoint period (also at each stage change and the end)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
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
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.out = str(run_dir)
    return cfg


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check flags. Raises ConfigError (argparse's own errors exit 2 directly).

    With ``--resume RUN_DIR`` the run's own saved configuration is returned (other flags are ignored).
    """
    a = build_parser().parse_args(argv)
    if a.resume:
        return load_run_config(Path(a.resume))
    if a.data is None:
        raise ConfigError("--data is required (an ImageNet-layout folder or 'demo'), or --resume RUN_DIR")
    defaults = DEMO_DEFAULTS if a.data == DEMO else FULL_DEFAULTS
    cfg = TrainConfig(
        data=a.data, out=a.out, model=a.model or defaults["model"], act=a.act,
        image_size=a.image_size or defaults["image_size"],
        curriculum=None if a.no_curriculum else a.curriculum or defaults["curriculum"],
        eval_size=a.eval_size, batch_size=a.batch_size, stage_batch=a.stage_batch, max_batch=a.max_batch, lr=a.lr,
        weight_decay=a.weight_decay, label_smoothing=a.label_smoothing, drop_path=a.drop_path,
        lr_schedule=a.lr_schedule, min_lr=a.min_lr, epochs=a.epochs,
        warmup_s=0.0 if a.warmup.strip() in ("0", "none") else _parse_duration("--warmup", a.warmup),
        budget_s=parse_budget(a.budget), device=a.device, amp=a.amp, compile=a.compile, workers=a.workers,
        seed=a.seed, eval_every=a.eval_every, log_every_s=a.log_every,
        ckpt_every_s=_parse_duration("--ckpt-every", a.ckpt_every),
    )
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
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ConfigError(f"--min-lr must lie in [0, --lr {cfg.lr}], got {cfg.min_lr}")
    if cfg.warmup_s >= cfg.budget_s:
        raise ConfigError(f"--warmup ({cfg.warmup_s:.0f}s) must be shorter than --budget ({cfg.budget_s:.0f}s)")
    if cfg.act != "hswish" and cfg.model not in LOCALITY_MODELS:
        raise ConfigError(f"--act {cfg.act} applies to the locality models ({', '.join(LOCALITY_MODELS)}), "
                          f"not {cfg.model}")
    if not cfg.log_every_s > 0:
        raise ConfigError(f"--log-every must be positive, got {cfg.log_every_s}")
    return cfg
