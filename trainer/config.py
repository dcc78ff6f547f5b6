"""The run's configuration: one dataclass, filled from command-line flags and checked before anything is written."""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from model import ACTIVATIONS, LOCALITY_MODELS, MODELS
from trainer.curriculum import CurriculumPlan, PlanError
from trainer.presets import PresetError, load_preset, preset_path
from trainer.schedule import SCHEDULES

PATCH_SIZE = 16
DEMO = "demo"
# The default recipe, the same for the demo and any folder (chosen by the recipe x dataset x budget table in
# BENCHMARKS.md): on CUDA, the paper's sizes placed in the budget, so the final size is reached at 60% of it at any
# speed; on the CPU, where a small stage's step is not cheaper per image, a fixed size; a peak lr of 1e-3 at batch 64
# (8e-3 per 512); a linear warm-up over the first 5% of the budget.
DEFAULT_CURRICULUM = "32:32@60%"  # what --curriculum auto (the default) means on CUDA; on the CPU, a fixed size
# What --data demo changes, over the defaults: its data, not its recipe. The demo's images are generated at 64-500 px
# and it is meant to learn in minutes on a 2-core CPU, so a tiny model at 96 px.
DEMO_LAYER: dict[str, Any] = {"model": "vit_local_tiny_patch16", "image_size": 96, "budget_s": 180.0}
NO_BUDGET = ("--budget is required with your own data (the run trains until it is spent): --budget 10m to try it, "
             "--budget 24h for the paper's benchmark")

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


def format_duration(seconds: float) -> str:
    """86400 -> '24h', 1800 -> '30m', 5400 -> '1h30m', 45 -> '45s' (what parse_budget reads back)."""
    parts, rest = [], float(seconds)
    for unit in ("h", "m", "s"):
        n = int(rest // _UNIT_SECONDS[unit]) if unit != "s" else rest
        if n:
            parts.append(f"{n:g}{unit}")
            rest -= n * _UNIT_SECONDS[unit]
    return "".join(parts) or "0"


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


def _duration(flag: str, zero: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if zero and str(value).strip() in ("0", "none"):
            return 0.0
        return _parse_duration(flag, str(value))
    return parse


def _warmup(value: Any) -> str:
    """'5%' (a share of the budget), a time ('5m', '300') or none ('0', 'none') -> its canonical text."""
    text = str(value).strip().lower()
    if text in ("0", "0%", "none", "0s"):
        return "0"
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise ConfigError(f"--warmup: cannot read {value!r}; use a time (5m) or a share of the budget (5%)") \
                from None
        if not 0 < share < 100:
            raise ConfigError(f"--warmup must be a share in (0%, 100%) of the budget, got {value!r}")
        return f"{share:g}%"
    return format_duration(_parse_duration("--warmup", text))


TRACK_EXTRA = 'pip install -e ".[track]"'
TOOLS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # --track name -> the module it needs


def _track(value: Any) -> str | None:
    """'tensorboard, mlflow' -> 'tensorboard,mlflow' (each known, once, in the order given); '' or 'none' -> None."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    for name in names:
        if name not in TOOLS:
            raise ConfigError(f"--track: unknown tool {name!r} (choose from {', '.join(TOOLS)})")
    return ",".join(dict.fromkeys(names))


def _check_installed(track: str | None) -> None:
    """Each --track tool's package is importable (found, not imported: the check stays cheap)."""
    import importlib.util

    for name in track.split(",") if track else []:
        try:
            found = importlib.util.find_spec(TOOLS[name]) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent package
            found = False
        if not found:
            raise ConfigError(f"--track {name}: the {TOOLS[name]} package is not installed ({TRACK_EXTRA})")


def _sizes(value: Any) -> str | None:
    return None if value is None else str(value)


def auto_curriculum(device: str) -> str | None:
    """--curriculum auto: the time-placed plan where small stages are cheaper per image (CUDA, the captured step),
    a fixed size on the CPU, where they are not (measured: BENCHMARKS.md, 'Curriculum forms on three datasets')."""
    if device == "auto":
        import torch  # only for the default device: every flag check runs before the heavy imports otherwise

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DEFAULT_CURRICULUM if device == "cuda" else None


def opt(default: Any, help: str, *, flag: str | None = None, type: Callable[[Any], Any] | None = None,  # noqa: A002
        choices: tuple[str, ...] | None = None, show: Callable[[Any], str] | None = None,
        metavar: str | None = None, action: str | None = None) -> Any:
    """One field of the configuration, declared once: its default, its flag (``--name`` from the field's name
    unless ``flag`` says otherwise), how a flag's text or a preset's value becomes the field's value (``type``),
    its choices and its help; the command line, its help text and the layering are all derived from this."""
    return field(default=default, metadata={"help": help, "flag": flag, "type": type, "choices": choices,
                                            "show": show, "metavar": metavar, "action": action})


@dataclass
class TrainConfig:
    data: str = opt(None, "ImageNet-layout folder (train/<class>/*.JPEG, val/<class>/*.JPEG), 'demo' for the "
                          "built-in generated dataset, or WebDataset shards: wds:DIR or wds:PATTERN with a "
                          "{train,validation} brace")
    out: str | None = opt(None, "run directory (default: runs/<timestamp>)")
    preset: str | None = opt(None, "a named configuration (see --list-presets); flags given override it")
    budget_s: float = opt(24 * 3600.0, "wall-clock budget: 24h, 90m, 3m, 45s, 1h30m or seconds; required with your "
                                       "own data (the paper-* presets: 24h)", flag="--budget",
                          type=_duration("--budget"), show=format_duration)
    budget_counts: str = opt("all", "charge everything to the budget (all) or training only (train, the paper's "
                                    "count)", choices=("all", "train"))
    model: str = opt("vit_local_small_patch16", "the network", choices=MODELS)
    act: str = opt("hswish", "FFN activation of the locality models (gelu: the paper's ablation)",
                   choices=tuple(sorted(ACTIVATIONS)))
    image_size: int = opt(224, f"final train size and eval size, a multiple of {PATCH_SIZE}", type=int)
    curriculum: str | None = opt("auto", "image-size curriculum: start at S px, add M px every N epochs, up to "
                                         "--image-size (S:M:N); or reach --image-size when P%% of the budget is "
                                         "spent, the stages before sharing that time (S:M@P%%); auto: "
                                         f"{DEFAULT_CURRICULUM.replace('%', '%%')} on CUDA, a fixed size on the CPU",
                                 metavar="S:M:N|S:M@P%|auto")
    eval_size: int | None = opt(None, "the final evaluation's size (default: chosen at the end on the --holdout "
                                      "slice among the training size and 1, 2 and 4 patches above; --image-size "
                                      "when no slice is held out)", type=int)
    holdout: float = opt(0.05, "share of the training split held out, never trained on, to choose the eval size "
                               "on when --eval-size is not given: at most 2,000 images, and none when it would be "
                               "under 250 or the budget is under 1h (0: none)", type=float)
    batch_size: int = opt(64, "images per step per process (per GPU; the global batch is this x the processes)",
                          type=int)
    stage_batch: str = opt("fixed", "tokens: scale the batch by (final/size)^2 at small stages (lr by its square "
                                    "root)", choices=("fixed", "tokens"))
    max_batch: int = opt(1024, "cap for --stage-batch tokens", type=int)
    lr: float = opt(8e-3, "lr for a batch of 512 (DeiT's rule): the peak lr is lr x global batch / 512", type=float)
    lr_schedule: str = opt("cosine-time", "time schedules anneal over the budget; cosine-epochs over --epochs",
                           choices=SCHEDULES)
    min_lr: float = opt(1e-5, "the schedules' floor", type=float)
    warmup: str = opt("5%", "linear warm-up: a time (5m) or a share of the budget (5%%)", type=_warmup,
                      show=lambda v: "none" if v == "0" else v)
    epochs: int | None = opt(None, "horizon of --lr-schedule cosine-epochs", type=int)
    weight_decay: float = opt(0.05, "AdamW weight decay, not on 1-D params", type=float)
    label_smoothing: float = opt(0.1, "label smoothing", type=float)
    drop_path: float | None = opt(None, "stochastic depth rate (default: the model's)", type=float)
    interp: str = opt("bilinear", "resize interpolation (the paper's text: bilinear; the authors' code: bicubic)",
                      choices=("bilinear", "bicubic"))
    min_area: float = opt(0.5, "random-resized-crop minimum area fraction (0.5: light crops, measured better than "
                               "DeiT's 0.08 at 1- and 4-minute budgets on the peer battery; the paper-* presets keep "
                               "0.08)", type=float)
    source_ratio: float = opt(2.0, "with a dataset prepared at several --max-size copies: read, per stage, the "
                                   "smallest copy whose shorter side is at least this times the stage size",
                              type=float)
    randaug: int = opt(0, "RandAugment magnitude 1..10 on timm's scale (0: off; DeiT 9)", type=int)
    randaug_n: int = opt(2, "RandAugment operations per image", type=int)
    mixup: float = opt(0.0, "mixup alpha (0: off; DeiT 0.8)", type=float)
    cutmix: float = opt(0.0, "cutmix alpha (0: off; DeiT 1.0)", type=float)
    mix_switch_prob: float = opt(0.5, "chance of cutmix instead of mixup when both are on", type=float)
    reprob: float = opt(0.0, "random erasing probability (0: off; DeiT 0.25)", type=float)
    ema: float = opt(0.0, "EMA decay of the weights, evaluated when on (0: off)", type=float)
    device: str = opt("auto", "training device (auto: cuda when available)", choices=("auto", "cpu", "cuda"))
    amp: str = opt("auto", "autocast dtype on CUDA (auto: bf16 where supported, else fp16 + grad scaler); CPU: off",
                   choices=("auto", "bf16", "fp16", "off"))
    step: str = opt("auto", "how each training step runs: graph captures the whole step in one CUDA graph per "
                            "stage (bf16 or fp32 on CUDA), compile uses torch.compile, eager runs it op by op "
                            "(auto: graph on CUDA unless --amp fp16, else eager)",
                    choices=("auto", "eager", "graph", "compile"))
    fused_ffn: str = opt("auto", "the locality FFN's h-swish -> 3x3 depth-wise conv -> h-swish as one Triton kernel "
                                 "(on: needs CUDA; auto: on on CUDA for the h-swish locality models; off: PyTorch's "
                                 "ops, the reference). The weights are the same either way",
                         choices=("auto", "on", "off"))
    decoder: str = opt("auto", "what decodes the images: mixed is DALI's GPU decoder (nvJPEG), cpu decodes on the CPU "
                               "and copies the batches to the GPU (auto: mixed on CUDA, cpu elsewhere)",
                       choices=("auto", "mixed", "cpu"))
    strict_fast_paths: bool = opt(False, "end the run (exit 2) instead of falling back when the captured step, the "
                                         "fused FFN or the GPU decoder fails or cannot run (for benchmarks that must "
                                         "time the path they name)", action="store_true")
    workers: int = opt(0, "DALI CPU threads (0: one per core)", type=int)
    data_handoff: str = opt("host", "GPU batches: host waits on the host for each decoded batch; stream makes the "
                                    "training stream wait for it on the device, so the host never blocks on GPU "
                                    "work", choices=("host", "stream"))
    seed: int = opt(0, "random seed", type=int)
    eval_every: int = opt(1, "evaluate every K epochs (0: only at the end)", type=int)
    ckpt_every_s: float = opt(1800.0, "checkpoint period (also at each stage change and the end)",
                              flag="--ckpt-every", type=_duration("--ckpt-every"), show=format_duration)
    log_every_s: float = opt(10.0, "seconds between metrics lines", flag="--log-every", type=float)
    track: str | None = opt(None, f"also send the run's metrics to these trackers, comma-separated: "
                                  f"{', '.join(TOOLS)} (needs the track extra: pip install -e \".[track]\")",
                            type=_track, metavar="LIST")
    track_project: str = opt("vitbudget", "the trackers' experiment (MLflow) or project (W&B) name")
    track_artifacts: bool = opt(False, "also upload model.safetensors to MLflow and W&B (summary.json and "
                                       "config.json always go)", action="store_true")
    profile: bool = opt(False, "instead of training: time the pipeline alone, the model step alone and the full "
                               "loop at each stage size, print a table, write profile.json and a torch.profiler "
                               "trace", action="store_true")
    check_gpu: bool = opt(False, "instead of training: build each stage's pipeline and step once, run a few steps "
                                 "of each fast path (captured step, fused FFN, GPU decoder) and of what it falls back "
                                 "to, and print what works on this machine and what each costs (--data: demo if not "
                                 "given)", action="store_true")
    profile_sizes: str | None = opt(None, "comma-separated sizes for --profile (default: the plan's stage sizes)",
                                    type=_sizes)
    profile_steps: int = opt(20, "timed steps per measurement for --profile", type=int)
    # not a flag: the flags given that changed a preset's value, as "--flag value (preset: value)"
    preset_overrides: list[str] = field(default_factory=list, metadata={"flag": False})
    # not a flag: processes training together (torchrun's WORLD_SIZE; 1 without it), set when the run starts and
    # again on each resume, which may use another number
    world_size: int = field(default=1, metadata={"flag": False})

    def __post_init__(self) -> None:
        if self.curriculum == "auto":  # resolved once, so config.json (and a resume) keeps the concrete plan
            self.curriculum = auto_curriculum(self.device)

    @functools.cached_property  # read by lr_at at every step
    def warmup_fraction(self) -> float:
        """The share of the budget the warm-up takes (0 without one)."""
        if self.warmup.endswith("%"):
            return float(self.warmup[:-1]) / 100
        return parse_budget(self.warmup) / self.budget_s if self.warmup != "0" else 0.0

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes: --batch-size is per process (per GPU)."""
        return self.batch_size * self.world_size

    @property
    def peak_lr(self) -> float:
        """DeiT's rule on the global batch: --lr is the lr for 512 images per step (the first term of
        ``trainer.schedule.lr_at``)."""
        from trainer.schedule import batch_rule_lr

        return batch_rule_lr(self.lr, self.global_batch)

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


def _flag_fields() -> list[Field]:
    return [f for f in fields(TrainConfig) if f.metadata.get("flag") is not False]


def demo_default(f: Field) -> Any:
    """A field's value with ``--data demo``, as its help shows it."""
    value = DEMO_LAYER[f.name]
    return f.metadata["show"](value) if f.metadata.get("show") else value


def flag_name(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _key(f: Field) -> str:
    """A field's name in preset files: its flag without the dashes (``budget``, ``image_size``)."""
    return flag_name(f)[2:].replace("-", "_")


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _convert(f: Field, value: Any, source: str) -> Any:
    """A flag's text or a preset's value -> the field's value, checked against its choices."""
    meta = f.metadata
    if value is None or meta.get("action"):
        return value
    if meta.get("type") is not None:
        try:
            value = meta["type"](value)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{flag_name(f)}: cannot read {value!r}{source}") from None
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{flag_name(f)}: {value!r}{source} is not one of {', '.join(meta['choices'])}")
    return value


def fail(prog: str, message: str, code: int = 2) -> int:
    """An input error as every command here reports one: ``prog: error: message``, one line on stderr; returns
    the exit status."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def not_patch_multiple(what: str, size: int) -> str | None:
    """Why ``size`` cannot be an image size (not a positive multiple of the patch size), or None if it can."""
    if size <= 0 or size % PATCH_SIZE:
        return f"{what}: {size} is not a positive multiple of the patch size {PATCH_SIZE}"
    return None


class OneLineParser(argparse.ArgumentParser):
    """argparse with one line and exit 2 for a bad flag (no usage block), as every other input error here."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, derived from the fields of TrainConfig (and four flags that are not fields)."""
    p = OneLineParser(prog="vit-train", description="Train a locality ViT within a wall-clock budget.",
                argument_default=argparse.SUPPRESS)
    for f in _flag_fields():
        meta, default = f.metadata, _default(f)
        shown = meta["show"](default) if meta.get("show") else default
        demo = f"; {demo_default(f)} with --data demo" if f.name in DEMO_LAYER else ""
        shown = f"{shown}{demo}".replace("%", "%%")  # argparse formats help with %
        help_text = meta["help"] + (f" (default: {shown})" if default is not None and not meta.get("action") else "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if meta.get("action"):
            kwargs["action"] = meta["action"]
        else:
            kwargs["metavar"] = meta.get("metavar") or ("{" + ",".join(meta["choices"]) + "}" if meta.get("choices")
                                                         else _key(f).upper())
        p.add_argument(flag_name(f), **kwargs)
    p.add_argument("--no-curriculum", dest="curriculum", action="store_const", const=None,
                   help="train at --image-size from the first epoch")
    p.add_argument("--compile", dest="step", action="store_const", const="compile", help="same as --step compile")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--resume", metavar="RUN_DIR",
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
    if "warmup_s" in saved and "warmup" not in saved:  # written when the warm-up was a time only
        saved["warmup"] = _warmup(saved["warmup_s"])
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.out = str(run_dir)
    return cfg


def parse_args(argv: list[str] | None = None, require_budget: bool = False) -> TrainConfig:
    """Parse and check flags. Raises ConfigError (argparse's own errors exit 2 directly). ``require_budget`` (the
    command line's): a run on the user's own data needs ``--budget`` unless a preset sets one.

    Layers, each over the one before: the fields' defaults, the demo's (with ``--data demo``), a preset's, the
    flags given. With ``--resume RUN_DIR`` the run's own saved configuration is returned (other flags are ignored).
    """
    given = vars(build_parser().parse_args(argv))
    if given.pop("list_presets", False):
        raise ListPresets()
    if "resume" in given:
        cfg = load_run_config(Path(given["resume"]))
        _check(cfg)
        return cfg
    if given.get("data") is None and given.get("check_gpu"):
        given["data"] = DEMO  # the check needs images to decode: the built-in ones will do
    if given.get("data") is None:
        raise ConfigError("--data is required (an ImageNet-layout folder or 'demo'), or --resume RUN_DIR")
    by_name = {f.name: f for f in _flag_fields()}
    values = {name: _default(f) for name, f in by_name.items()}
    if given["data"] == DEMO:
        values.update(DEMO_LAYER)
    overrides: list[str] = []
    if "preset" in given:
        by_key = {_key(f): f for f in _flag_fields()}
        try:
            preset = load_preset(given["preset"])
        except PresetError as e:
            raise ConfigError(str(e)) from None
        source = f" in preset {given['preset']} ({preset_path(given['preset'])})"
        for key, value in preset.items():
            if key not in by_key:
                raise ConfigError(f"preset file {preset_path(given['preset'])}: unknown key {key!r} (not a "
                                  f"vit-train flag)")
            f = by_key[key]
            converted = _convert(f, value, source)
            values[f.name] = converted
            if f.name in given and given[f.name] != converted and f.name != "preset":
                shown = f.metadata["show"] if f.metadata.get("show") else (lambda v: v)
                overrides.append(f"{flag_name(f)} {shown(_convert(f, given[f.name], ''))} (preset: {value})")
        values["preset"] = given["preset"]
    if require_budget and not ({"budget_s", "profile", "check_gpu"} & given.keys()) and given["data"] != DEMO \
            and "budget" not in (preset if "preset" in given else {}):
        raise ConfigError(NO_BUDGET)
    for name, value in given.items():
        values[name] = _convert(by_name[name], value, "")
    cfg = TrainConfig(**values)
    cfg.preset_overrides = sorted(overrides)
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    """Every flag's value, alone and with the others: the first that cannot be used raises a one-line ConfigError."""
    _check_sizes_and_plan(cfg)
    _check_optimizer(cfg)
    _check_augmentation(cfg)
    _check_run(cfg)
    _check_device(cfg)


def _check_sizes_and_plan(cfg: TrainConfig) -> None:
    sizes = [("--image-size", cfg.image_size), *([("--eval-size", cfg.eval_size)] if cfg.eval_size is not None
                                                  else [])]
    for flag, size in sizes:
        if why := not_patch_multiple(flag, size):
            raise ConfigError(why)
    try:
        cfg.plan()
    except PlanError as e:
        raise ConfigError(str(e)) from None
    for size in cfg.profile_size_list():
        if why := not_patch_multiple("--profile-sizes", size):
            raise ConfigError(why)


def _check_optimizer(cfg: TrainConfig) -> None:
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
    if cfg.warmup_fraction >= 1:
        raise ConfigError(f"--warmup ({cfg.warmup}) must be shorter than --budget ({format_duration(cfg.budget_s)})")
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"--ema must lie in [0, 1), got {cfg.ema}")


def _check_augmentation(cfg: TrainConfig) -> None:
    if cfg.act != "hswish" and cfg.model not in LOCALITY_MODELS:
        raise ConfigError(f"--act {cfg.act} applies to the locality models ({', '.join(LOCALITY_MODELS)}), "
                          f"not {cfg.model}")
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
    if not 0 <= cfg.holdout < 0.5:
        raise ConfigError(f"--holdout must lie in [0, 0.5), got {cfg.holdout}")
    if not 0 < cfg.min_area <= 1:
        raise ConfigError(f"--min-area must lie in (0, 1], got {cfg.min_area}")
    if cfg.source_ratio < 1:
        raise ConfigError(f"--source-ratio must be at least 1 (a copy smaller than the stage would be upsampled), "
                          f"got {cfg.source_ratio}")


def _check_run(cfg: TrainConfig) -> None:
    if not cfg.log_every_s > 0:
        raise ConfigError(f"--log-every must be positive, got {cfg.log_every_s}")
    if cfg.profile_steps < 1:
        raise ConfigError(f"--profile-steps must be positive, got {cfg.profile_steps}")
    _check_installed(cfg.track)
    if not cfg.track_project.strip():
        raise ConfigError("--track-project must not be empty")
    if cfg.check_gpu and cfg.profile:
        raise ConfigError("--check-gpu and --profile are two different runs: give one of them")


def _check_device(cfg: TrainConfig) -> None:
    """The flags that need CUDA or Triton, against this machine (torch imported only for them)."""
    if cfg.fused_ffn == "on" and (cfg.model not in LOCALITY_MODELS or cfg.act != "hswish"):
        raise ConfigError(f"--fused-ffn on: the fused kernel is the h-swish locality FFN's; {cfg.model} with --act "
                          f"{cfg.act} has none (use auto or off)")
    if cfg.device == "cuda" or cfg.fused_ffn == "on" or cfg.decoder == "mixed":
        import torch  # only here: every other check runs before the heavy imports

        cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not cuda:
            raise ConfigError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")
        if cfg.decoder == "mixed" and (cfg.device == "cpu" or not cuda):
            raise ConfigError("--decoder mixed: DALI's GPU decoder needs a CUDA device; on the CPU the images are "
                              "decoded there (use auto or cpu)")
        if cfg.fused_ffn == "on":
            from model import fused_ffn

            if cfg.device == "cpu" or not cuda:
                raise ConfigError("--fused-ffn on: the Triton kernel runs on CUDA; on the CPU the FFN runs PyTorch's "
                                  "ops (use auto or off)")
            if not fused_ffn.available():
                raise ConfigError("--fused-ffn on: Triton is not installed (it ships with PyTorch's Linux wheels); "
                                  "use auto or off")
