"""`vit-train`: check the flags and the data, make (or resume) the run directory, train, write the summary."""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines import DatasetError, ImageDecodeError, index_dataset
from trainer.budget import Budget
from trainer.checkpoint import NoCheckpointError, list_checkpoints, load_latest
from trainer.config import DEMO, ConfigError, ListPresets, TrainConfig, load_run_config, parse_args
from trainer.loop import Diverged, StopFlag, StopRequested, train
from trainer.readout import Readout
from trainer.rundir import RunDir


def _fail(message: str, code: int = 2) -> int:
    print(f"vit-train: error: {message}", file=sys.stderr)
    return code


def _data_root(cfg: TrainConfig) -> Path:
    if cfg.data == DEMO:
        from pipelines.demo_dataset import default_demo_root, ensure_demo_dataset

        root = default_demo_root()
        if not (root / "DEMO_INFO.json").exists():
            print(f"building the demo dataset in {root} (once; reused after) ...", flush=True)
        return ensure_demo_dataset(root)
    return Path(cfg.data).expanduser()


def _finished(summary: Path) -> bool:
    try:
        return json.loads(summary.read_text()).get("stop_reason") == "budget"
    except (OSError, ValueError):  # absent, or not whole: summaries are atomic, so absent in practice
        return False


def _prepare_out(cfg: TrainConfig) -> tuple[TrainConfig, Path, dict[str, Any] | None]:
    """A new run directory, or an existing one holding checkpoints: then the run resumes with its own config."""
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return cfg, out, None
    if not list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"--out {out} is not empty and holds no checkpoint to resume; choose a new run directory")
    if _finished(out / "summary.json"):
        raise ConfigError(f"{out} already finished its budget (see its summary.json); choose a new --out")
    loaded = load_latest(out / "checkpoints")
    for path, why in loaded.skipped:
        print(f"vit-train: warning: skipping unreadable checkpoint {path} ({why})", file=sys.stderr)
    print(f"resuming {out} from {loaded.path.name} (step {loaded.payload['state']['step']}, "
          f"{loaded.payload['budget_spent_s']:.0f}s of the budget already spent)", flush=True)
    return load_run_config(out), out, {**loaded.payload, "path": str(loaded.path)}


def _install_signal_handlers(stop: StopFlag) -> None:
    """First SIGTERM/Ctrl-C: checkpoint at the next step and exit. A second Ctrl-C: exit at once."""

    def handler(signum: int, _frame: Any) -> None:
        if stop.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.reason = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run() -> int:
    """The console script: the budget's clock starts when the process began importing, not at ``main``."""
    from trainer import STARTED_AT

    return main(started_at=STARTED_AT)


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    started_at = time.monotonic() if started_at is None else started_at
    try:
        cfg = parse_args(argv)
        for override in cfg.preset_overrides:
            print(f"preset {cfg.preset}: {override}", flush=True)
        cfg, out, resume = _prepare_out(cfg)
        before_data = time.monotonic()
        train_split, val_split = index_dataset(_data_root(cfg))
        demo_build_s = time.monotonic() - before_data if cfg.data == DEMO else 0.0
        if len(train_split) < cfg.batch_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(train_split)} images "
                              f"in {train_split.root}: training drops partial batches")
    except ListPresets:
        from trainer.presets import describe_presets

        print("\n".join(describe_presets()))
        return 0
    except (ConfigError, DatasetError, NoCheckpointError) as e:
        return _fail(str(e))

    import nvidia.dali
    import timm
    import torch

    # The clock started with the process (imports included); a first build of the demo dataset is not charged;
    # a resumed run starts from what its earlier attempts spent.
    budget = Budget(cfg.budget_s, spent_before=resume["budget_spent_s"] if resume else 0.0,
                    start=started_at + demo_build_s)
    run = RunDir(out)
    if resume:
        run.log("resume", checkpoint=resume["path"], step=resume["state"]["step"],
                spent_before_s=round(budget.spent_before, 3))
    else:
        run.write_config({**asdict(cfg), "peak_lr": cfg.peak_lr, "data_root": str(train_split.root.parent),
                          "classes": list(train_split.classes),
                          "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                       "dali": nvidia.dali.__version__}})
    if cfg.profile:
        from trainer.profile import profile, table

        report = profile(cfg, train_split, out, cfg.profile_size_list(), steps=cfg.profile_steps)
        print(table(report))
        print(f"wrote {out / 'profile.json'} and {out / report['trace']}")
        run.close()
        return 0
    stop = StopFlag()
    _install_signal_handlers(stop)

    def ended(reason: str, code: int, message: str, **extra: Any) -> int:
        run.log(reason, message=message, elapsed_s=round(budget.elapsed, 3), **extra)
        run.write_summary({"budget_s": cfg.budget_s, "model": cfg.model, "run_dir": str(out), "stop_reason": reason,
                           "message": message, "elapsed_s": round(budget.elapsed, 3), **extra})
        run.close()
        return _fail(message, code=code)

    try:
        with Readout(cfg.budget_s, clock=lambda: budget.elapsed) as readout:
            summary = train(cfg, train_split, val_split, run, readout, budget, resume=resume, stop=stop)
    except ImageDecodeError as e:
        return ended("error", 1, str(e))
    except StopRequested as e:
        signum = signal.Signals[e.reason]
        return ended("stopped", 128 + signum, f"stopped by {e.reason}; checkpoint {e.checkpoint.name} written; "
                     f"resume with: vit-train --resume {out}", signal=e.reason)
    except Diverged as e:
        kept = list_checkpoints(out / "checkpoints")
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written"
        return ended("diverged", 1, f"{e}; {last}; try a lower --lr (or --amp fp16, whose scaler skips such steps)")
    except KeyboardInterrupt:
        return ended("interrupted", 130, f"interrupted at once (second Ctrl-C); resume with: vit-train --resume {out}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run.write_summary(summary)
    run.close()
    print(f"done: val top1 {100 * summary['top1']:.2f}%  top5 {100 * summary['top5']:.2f}%  "
          f"{summary['epochs']} epochs in {summary['elapsed_s']:.0f}s  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
