"""A run directory, opened for use after (or during) training: its configuration, its classes, its newest weights
(the final ``model.safetensors``, or the newest readable checkpoint of an unfinished run), EMA or raw, and the
model they fill. ``vit-eval``, ``vit-predict`` and ``vit-export`` (trainer/commands.py) are thin layers over it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.files import atomic_folder
from trainer.config import PATCH_SIZE, ConfigError, TrainConfig, load_run_config, not_patch_multiple
from trainer.rundir import write_json_atomic

WEIGHTS = ("auto", "ema", "raw")
FINAL = "model.safetensors"
MODEL_FOLDER = "model"  # RUN_DIR/model: the timm-loadable folder a finished run leaves


class RunError(ValueError):
    """The run directory or a request on it cannot be used; the message is one line."""


@dataclass
class OpenedRun:
    path: Path
    cfg: TrainConfig
    classes: tuple[str, ...]
    data_root: str | None  # a folder, or a wds: spec
    weights: str  # "ema" or "raw": which weights fill the model
    source: Path  # the file they came from: model.safetensors or a checkpoint
    state_dict: dict[str, Any]
    grid_size: int  # the image size the saved position embedding was trained at

    def build(self) -> Any:
        """The network, filled (PyTorch's ops for the locality FFN: the reference path, on any device)."""
        from model import build_model

        net = build_model(self.cfg.model, num_classes=len(self.classes), image_size=self.grid_size, act=self.cfg.act)
        net.load_state_dict(self.state_dict)
        return net.eval()

    @property
    def eval_size(self) -> int:
        """The size the run's final evaluation used (summary.json: chosen on its held-out slice, or --eval-size),
        else the configured one."""
        try:
            return int(json.loads((self.path / "summary.json").read_text())["eval_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.cfg.final_eval_size


def check_size(flag: str, size: int) -> int:
    if why := not_patch_multiple(flag, size):
        raise RunError(why)
    return size


def open_run(run_dir: Path, weights: str = "auto") -> OpenedRun:
    """Open ``run_dir``: RunError (one line) if it is not a run, holds no readable weights, or has no EMA weights
    when ``weights="ema"``. ``auto`` gives what the run itself evaluated: EMA when it kept them, else raw."""
    if weights not in WEIGHTS:
        raise RunError(f"--weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a vit-train run directory (no config.json)")
    try:
        cfg = load_run_config(run_dir)
        saved = json.loads((run_dir / "config.json").read_text())
    except (ConfigError, ValueError) as e:
        raise RunError(str(e)) from None
    kept_ema = cfg.ema > 0
    if weights == "ema" and not kept_ema:
        raise RunError(f"{run_dir} kept no EMA weights (trained with --ema 0): use --weights raw")
    kind = weights if weights != "auto" else ("ema" if kept_ema else "raw")
    state, source = _weights(run_dir, kind, evaluated="ema" if kept_ema else "raw")
    classes = tuple(saved.get("classes") or ())
    if not classes:
        raise RunError(f"{run_dir}/config.json lists no classes")
    root = saved.get("data_root")
    return OpenedRun(run_dir, cfg, classes, root or None, kind, source, state, _grid_size(state))


def _weights(run_dir: Path, kind: str, evaluated: str) -> tuple[dict[str, Any], Path]:
    """The final weights when they are the kind asked for (they are what the run evaluated), else the newest
    checkpoint that loads."""
    final = run_dir / FINAL
    if kind == evaluated and final.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(final), final
        except (SafetensorError, OSError):
            pass  # unreadable: fall back to the checkpoints
    from trainer.checkpoint import NoCheckpointError, load_latest

    try:
        loaded = load_latest(run_dir / "checkpoints")
    except NoCheckpointError:
        raise RunError(f"{run_dir} holds no readable weights (no {FINAL}, no checkpoint that loads)") from None
    payload = loaded.payload
    if kind == "ema" and "ema" not in payload:
        raise RunError(f"{loaded.path} holds no EMA weights: use --weights raw")
    return payload["ema" if kind == "ema" else "model"], loaded.path


def _grid_size(state: dict[str, Any]) -> int:
    """The image size of the saved position embedding's grid (one class token before the patch tokens)."""
    tokens = state["pos_embed"].shape[1] - 1
    side = math.isqrt(tokens)
    return side * PATCH_SIZE


def timm_config(run: OpenedRun, image_size: int) -> dict[str, Any]:
    """config.json of timm's Hugging Face layout: what ``timm.create_model("local-dir:…", pretrained=True)``
    builds, and what ``timm.data.resolve_data_config`` reads (the run's eval preprocessing)."""
    from pipelines import IMAGENET_MEAN, IMAGENET_STD
    from pipelines.dali import EVAL_CROP_FRACTION

    model_args: dict[str, Any] = {"img_size": run.grid_size}
    if run.cfg.model.startswith("vit_local_"):
        model_args["act"] = run.cfg.act
    return {
        "architecture": run.cfg.model,
        "num_classes": len(run.classes),
        "label_names": list(run.classes),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, image_size, image_size], "fixed_input_size": False,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "interpolation": run.cfg.interp, "crop_pct": EVAL_CROP_FRACTION, "crop_mode": "center",
            "num_classes": len(run.classes),
        },
        "vitbudget": {"run_dir": str(run.path), "weights": run.weights, "source": run.source.name},
    }


def write_model_folder(run: OpenedRun, out: Path, image_size: int | None = None) -> Path:
    """``out``/config.json and ``out``/model.safetensors, built in a temporary folder beside ``out`` and renamed
    into place: a reader sees the old folder or the new one, never half of one."""
    from trainer.rundir import save_safetensors_atomic

    with atomic_folder(out) as tmp:
        save_safetensors_atomic(run.state_dict, tmp / FINAL)
        write_json_atomic(tmp / "config.json", timm_config(run, image_size or run.eval_size))
    return out
