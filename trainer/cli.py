"""`vit-train`: check the flags and the data, make (or resume) the run directory, train, write the summary."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipelines import DatasetError, ImageDecodeError, open_dataset
from pipelines.folder import describe_skipped
from trainer import dist
from trainer.budget import Budget
from trainer.checkpoint import NoCheckpointError, list_checkpoints, load_latest
from trainer.config import DEMO, ConfigError, ListPresets, TrainConfig, fail, load_run_config, parse_args
from trainer.fastpath import FastPathError
from trainer.loop import Diverged, StopFlag, StopRequested, train
from trainer.readout import Readout
from trainer.rundir import NullRunDir, RunDir

Say = Callable[..., None]  # say(text, err=False): rank 0 prints it (to stderr with err=True)


def _fail(message: str, code: int = 2) -> int:
    return fail("vit-train", message, code)


def _data_root(cfg: TrainConfig, say: Say) -> Path | str:
    """The demo's folder (built on first use), a folder, or a ``wds:`` spec of WebDataset shards."""
    from pipelines.wds import absolute, is_wds

    if is_wds(cfg.data):
        return absolute(cfg.data)
    if cfg.data == DEMO:
        from pipelines.demo_dataset import default_demo_root, ensure_demo_dataset

        root = default_demo_root()
        if not (root / "DEMO_INFO.json").exists():
            say(f"building the demo dataset in {root} (once; reused after) ...")
        return ensure_demo_dataset(root)
    return Path(cfg.data).expanduser()


def _finished(summary: Path) -> bool:
    try:
        return json.loads(summary.read_text()).get("stop_reason") == "budget"
    except (OSError, ValueError):  # absent, or not whole: summaries are atomic, so absent in practice
        return False


def _prepare_out(cfg: TrainConfig, say: Say) -> tuple[TrainConfig, Path, dict[str, Any] | None]:
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
        say(f"vit-train: warning: skipping unreadable checkpoint {path} ({why})", err=True)
    say(f"resuming {out} from {loaded.path.name} (step {loaded.payload['state']['step']}, "
        f"{loaded.payload['budget_spent_s']:.0f}s of the budget already spent)")
    return load_run_config(out), out, {**loaded.payload, "path": str(loaded.path)}


def _install_signal_handlers(stop: StopFlag) -> None:
    """First SIGTERM/Ctrl-C: checkpoint at the next step and exit. A second Ctrl-C: exit at once."""

    def handler(signum: int, _frame: Any) -> None:
        if stop.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.reason = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _checks_passed(world: dist.World, failure: str | None) -> bool:
    """Every rank's checks, agreed: any failure ends every rank (exit 2, nothing written). The message is printed
    once, by rank 0, or where rank 0 passed, by each rank that failed (a folder missing on one node)."""
    failed_on_0 = world.rank0(failure is not None)
    passed = world.all_ok(failure is None)
    if failure is not None and (world.is_main or not failed_on_0):
        _fail(failure)
    return passed


def run() -> int:
    """The console script: the budget's clock starts when the process began importing, not at ``main``."""
    from trainer import STARTED_AT

    return main(started_at=STARTED_AT)


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    started_at = time.monotonic() if started_at is None else started_at
    try:
        world = dist.world_from_env()
    except ValueError as e:
        return _fail(f"torchrun's environment: {e}")
    try:
        cfg = parse_args(argv, require_budget=True)
    except ListPresets:
        from trainer.presets import describe_presets

        print("\n".join(describe_presets()))
        return 0
    except (ConfigError, NoCheckpointError) as e:  # the same flags on every rank: rank 0 says it
        return _fail(str(e)) if world.is_main else 2
    try:
        world = dist.init(_training_device(cfg))  # under torchrun: join the process group (else a no-op)
        return _main(cfg, world, started_at)
    finally:
        dist.shutdown()


def _training_device(cfg: TrainConfig) -> str:
    from trainer.step import resolve_device

    return resolve_device(cfg.device).type


@dataclass
class _Checked:
    """What the start-up checks found, every rank agreeing: the run's config, folder, data and resume point."""
    cfg: TrainConfig
    out: Path
    resume: dict[str, Any] | None
    train_split: Any
    val_split: Any
    demo_build_s: float
    data_root: str  # absolute: the folder, or the wds: spec
    tracking: Any = None  # rank 0's started --track tools (trainer.track.Tracking), if any


def _main(cfg: TrainConfig, world: dist.World, started_at: float) -> int:
    def say(text: str, err: bool = False) -> None:  # rank 0 speaks for the run
        if world.is_main:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    checked = _start_checks(cfg, world, say)
    if checked is None:
        return 2
    cfg, out, resume = checked.cfg, checked.out, checked.resume
    if cfg.check_gpu:  # writes nothing: a table on the console
        from trainer.doctor import check, table

        rows = check(cfg, checked.train_split, say=say)
        print(table(rows))
        return 0
    # The clock started with the process (imports included); a first build of the demo dataset is not charged;
    # a resumed run starts from what its earlier attempts spent.
    budget = Budget(cfg.budget_s, spent_before=resume["budget_spent_s"] if resume else 0.0,
                    start=started_at + checked.demo_build_s)
    run = _open_run(checked, world, budget)
    try:
        if cfg.profile:
            from trainer.profile import profile, table

            report = profile(cfg, checked.train_split, out, cfg.profile_size_list(), steps=cfg.profile_steps)
            print(table(report))
            print(f"wrote {out / 'profile.json'} and {out / report['trace']}")
            return 0
        return _train(checked, world, run, budget, say)
    finally:
        run.close()  # whatever the exit: metrics.jsonl closed, trackers drained and closed


def _start_checks(cfg: TrainConfig, world: dist.World, say: Say) -> _Checked | None:
    """The flags against the run directory and the data, on every rank, before anything is written, then rank 0's
    start of the --track tools (undone if one does not start): None (and one line, from rank 0) if any failed."""
    failure, root = None, None
    try:
        if (cfg.profile or cfg.check_gpu) and world.distributed:
            raise ConfigError(f"--{'profile' if cfg.profile else 'check-gpu'} measures one process: run it without "
                              f"torchrun")
        for override in cfg.preset_overrides:
            say(f"preset {cfg.preset}: {override}")
        cfg, out, resume = _prepare_out(cfg, say)  # reads only: every rank checks before rank 0 writes
        cfg = replace(cfg, world_size=world.world_size)  # a resume may run on another number of processes
        before_data = time.monotonic()
        if world.local_rank == 0:  # one process per machine builds the demo dataset; the others wait for it
            root = _data_root(cfg, say)
    except (ConfigError, DatasetError, NoCheckpointError) as e:
        failure = str(e)
    if not _checks_passed(world, failure):
        return None
    try:
        root = root or _data_root(cfg, say)
        train_split, val_split = open_dataset(root)
        for split in (train_split, val_split):  # nothing a user gave is dropped unseen
            if split.skipped:
                say(f"{split.root}: {describe_skipped(split.skipped)} (not images DALI decodes)", err=True)
        demo_build_s = time.monotonic() - before_data if cfg.data == DEMO else 0.0
        shard = len(train_split) // world.world_size
        if shard < cfg.batch_size:
            where = f"{len(train_split)} images in {train_split.root}" + (
                f" ({shard} per process over {world.world_size})" if world.distributed else "")
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {where}: training drops partial "
                              f"batches")
    except (ConfigError, DatasetError) as e:
        failure = str(e)
    if not _checks_passed(world, failure):
        return None
    tracking, failure = _start_tracking(cfg, out, world)
    if cfg.track and not _checks_passed(world, failure):
        return None
    data_root = root if isinstance(root, str) else str(train_split.root.parent.resolve())
    return _Checked(cfg, out, resume, train_split, val_split, demo_build_s, data_root, tracking)


def _start_tracking(cfg: TrainConfig, out: Path, world: dist.World) -> tuple[Any, str | None]:
    """Rank 0 starts the --track tools once the flags and the data have passed, before anything else is written: a
    tool that does not start (a refused store or URI, no W&B login) is a failed check, and its start is undone."""
    if not cfg.track or cfg.profile or cfg.check_gpu or not world.is_main:
        return None, None
    from trainer.track import TrackerStartError, Tracking

    try:
        return Tracking(cfg.track, out, cfg.track_project, cfg.track_artifacts), None
    except TrackerStartError as e:
        return None, str(e)


def _open_run(checked: _Checked, world: dist.World, budget: Budget) -> RunDir:
    """Rank 0's run directory (with its trackers, if asked for): the config of a new run, or the resume line."""
    import nvidia.dali
    import timm
    import torch

    cfg, resume, train_split = checked.cfg, checked.resume, checked.train_split
    if not world.is_main:
        return NullRunDir(checked.out)
    run = RunDir(checked.out, tracking=checked.tracking)
    if resume:
        run.log("resume", checkpoint=resume["path"], step=resume["state"]["step"],
                spent_before_s=round(budget.spent_before, 3), world_size=world.world_size)
    else:
        run.write_config({**asdict(cfg), "peak_lr": cfg.peak_lr, "global_batch": cfg.global_batch,
                          "data_root": checked.data_root,
                          "classes": list(train_split.classes),
                          "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                       "dali": nvidia.dali.__version__}})
    return run


def _train(checked: _Checked, world: dist.World, run: RunDir, budget: Budget, say: Say) -> int:
    """Train to the end of the budget, or to an early end: each writes its line, its summary and its exit code."""
    cfg, out = checked.cfg, checked.out
    stop = StopFlag()
    _install_signal_handlers(stop)

    def ended(reason: str, code: int, message: str, together: bool = True, **extra: Any) -> int:
        """The run ends early. ``together``: every rank reached this end at the same step (an agreed stop); rank 0
        writes and says it, the others wait for its files. Otherwise this rank alone ends, and says why."""
        run.log(reason, message=message, elapsed_s=round(budget.elapsed, 3), **extra)
        run.write_summary({"budget_s": cfg.budget_s, "model": cfg.model, "run_dir": str(out), "stop_reason": reason,
                           "message": message, "elapsed_s": round(budget.elapsed, 3), **extra})
        run.close()
        if together:
            world.barrier()
        return _fail(message, code=code) if world.is_main or not together else code

    # rank 0 shows the readout; the others print nothing but errors
    readout = Readout(cfg.budget_s, clock=lambda: budget.elapsed,
                      **({} if world.is_main else {"live": False, "console": _silent_console()}))
    try:
        with readout:
            summary = train(cfg, checked.train_split, checked.val_split, run, readout, budget,
                            resume=checked.resume, stop=stop, world=world)
    except ImageDecodeError as e:  # found by one rank: it ends, and torchrun ends the others
        return ended("error", 1, str(e), together=False)
    except FastPathError as e:  # --strict-fast-paths: a fast path failed where it first ran
        return ended("error", 2, str(e), together=False)
    except StopRequested as e:
        signum = signal.Signals[e.reason]
        return ended("stopped", 128 + signum, f"stopped by {e.reason}; checkpoint {e.checkpoint.name} written; "
                     f"resume with: vit-train --resume {out}", signal=e.reason)
    except Diverged as e:
        kept = list_checkpoints(out / "checkpoints")
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written"
        return ended("diverged", 1, f"{e}; {last}; try a lower --lr (or --amp fp16, whose scaler skips such steps)")
    except KeyboardInterrupt:
        return ended("interrupted", 130, f"interrupted at once (second Ctrl-C); resume with: vit-train --resume {out}",
                     together=False)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run.write_summary(summary)
    run.close()
    if world.is_main:  # the trained model as timm's Hugging Face layout: RUN_DIR/model
        from trainer.commands import export_finished_run

        export_finished_run(out)
    world.barrier()
    say(f"done: val top1 {100 * summary['top1']:.2f}%  top5 {100 * summary['top5']:.2f}%  "
        f"{summary['epochs']} epochs in {summary['elapsed_s']:.0f}s  -> {out}")
    return 0


def _silent_console() -> Any:
    from rich.console import Console

    return Console(quiet=True)


if __name__ == "__main__":
    sys.exit(run())
