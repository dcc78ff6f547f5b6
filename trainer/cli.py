"""`vit-train`: check the flags and the data, make the run directory, train, write the summary."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipelines import DatasetError, ImageDecodeError, index_dataset
from trainer.budget import Budget
from trainer.config import DEMO, ConfigError, TrainConfig, parse_args
from trainer.loop import train
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


def _out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; choose a new run directory")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        out = _out_dir(cfg)
        train_split, val_split = index_dataset(_data_root(cfg))
        if len(train_split) < cfg.batch_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(train_split)} images "
                              f"in {train_split.root}: training drops partial batches")
    except (ConfigError, DatasetError) as e:
        return _fail(str(e))

    import nvidia.dali
    import timm
    import torch

    budget = Budget(cfg.budget_s)  # the clock starts once the data is found (a first demo build is not charged)
    run = RunDir(out)
    run.write_config({**asdict(cfg), "data_root": str(train_split.root.parent), "classes": list(train_split.classes),
                      "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                   "dali": nvidia.dali.__version__}})
    base = {"budget_s": cfg.budget_s, "model": cfg.model, "run_dir": str(out)}
    try:
        with Readout(cfg.budget_s, clock=lambda: budget.elapsed) as readout:
            summary = train(cfg, train_split, val_split, run, readout, budget)
    except ImageDecodeError as e:
        run.log("error", message=str(e), elapsed_s=round(budget.elapsed, 3))
        run.write_summary({**base, "stop_reason": "error", "error": str(e), "elapsed_s": round(budget.elapsed, 3)})
        run.close()
        return _fail(str(e), code=1)
    except KeyboardInterrupt:
        run.log("interrupted", elapsed_s=round(budget.elapsed, 3))
        run.write_summary({**base, "stop_reason": "interrupted", "elapsed_s": round(budget.elapsed, 3)})
        run.close()
        return _fail(f"interrupted; the run directory {out} holds what was done", code=130)
    run.write_summary(summary)
    run.close()
    print(f"done: val top1 {100 * summary['top1']:.2f}%  top5 {100 * summary['top5']:.2f}%  "
          f"{summary['epochs']} epochs in {summary['elapsed_s']:.0f}s  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
