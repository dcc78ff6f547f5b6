"""Trackers: the run's one event stream (what ``RunDir.log`` writes to metrics.jsonl) also sent to TensorBoard,
MLflow and Weights & Biases (``--track tensorboard,mlflow,wandb``).

Nothing here measures anything: ``Tracking.event`` turns each metrics line into the same named scalars, texts and
hyperparameters for every tool, and hands them to one worker thread per tool, so a slow or failing tool never
holds up a training step. The tools start before the run trains (``Tracking`` waits for them): one that does not
start (a refused store or URI, no W&B login, a broken install) is a configuration error, ``TrackerStartError``, and
what the start made is undone. A tool that raises after its start is dropped with one warning line and the run goes
on; all are flushed and closed on every exit path. Rank 0 alone tracks (the other ranks' RunDir writes nothing).

A resumed run continues the same tracked run: the tools' run ids are kept in ``RUN_DIR/track.json``, and the
steps a resumed run trains again (from its checkpoint to where the killed attempt had logged) are not sent twice.
The x-axis only grows (W&B drops a step below one it has), so a resumed run sends nothing at or below the killed
attempt's last logged step of any kind: its last eval line (one an epoch) can be past its last train line (one every
few seconds), and the train points between them are not in the tools' history, nor are the lines of a killed
attempt's last BATCH_S seconds, which it had not sent. metrics.jsonl has them all.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.metrics import namespaced
from trainer.rundir import read_events, write_json_atomic

BATCH_S = 5.0  # a tool receives the run's events at most this late, in one call per kind
CLOSE_TIMEOUT_S = 60.0  # what the end of a run waits for a tool to drain its queue and close
START_TIMEOUT_S = 60.0  # what the run waits for its tools to start before it trains: longer is a start failure
STATE_FILE = "track.json"

ENDS = {"budget": "FINISHED", "stopped": "KILLED", "interrupted": "KILLED", "diverged": "FAILED", "error": "FAILED"}


Row = tuple[int, dict[str, float], float]  # one metrics line's scalars: (step, {name: value}, its wall time)


class TrackerStartError(Exception):
    """A --track tool that did not start: the run ends before it trains (vit-train: exit 2). The message is one line
    naming each such tool and its store; what the start wrote has been undone."""


def warn(message: str) -> None:
    print(f"vit-train: warning: {message}", file=sys.stderr, flush=True)


def _reason(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _snapshot(folder: Path) -> dict[Path, str]:
    """What a folder holds (recursively, links not followed): each path, with a link's target ('' otherwise)."""
    if not folder.is_dir():
        return {}
    return {p: os.readlink(p) if p.is_symlink() else "" for p in folder.rglob("*")}


def _restore(folder: Path, before: dict[Path, str], made: Path | None) -> None:
    """Undo what a failed start wrote: the folder it made (``made``: the run directory or its topmost new parent),
    or in a folder that was there (a resume) the paths that were not, and the links it re-pointed (W&B's)."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for path, target in sorted(_snapshot(folder).items()):  # a folder before what it holds
        if path not in before and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif (path not in before or before[path] != target) and (path.exists() or path.is_symlink()):
            path.unlink()
            if before.get(path):
                path.symlink_to(before[path])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as one level of str/int/float/bool values (what all three tools take)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[prefix + key] = json.dumps(value)
        elif value is None:
            out[prefix + key] = "none"
        else:
            out[prefix + key] = value
    return out


def _stage_text(f: dict[str, Any]) -> str:
    return (f"stage {f.get('stage')}: {f.get('image_size')} px, batch {f.get('batch_size')}, "
            f"peak lr {f.get('peak_lr', 0):.3g}, from epoch {f.get('epoch')}")


def _stage_start(stage: dict[str, Any]) -> str:
    """A plan's stage begins at an epoch, or (the time form) at a share of the budget."""
    if stage.get("starts_at") is None:
        return f"epoch{stage.get('first_epoch') or 0}"
    return f"{100 * stage['starts_at']:.3g}%"


def _merge_scalars(calls: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
    """Consecutive ``scalars`` calls (one row of (step, values) each) as one call with all their rows."""
    merged: list[tuple[str, tuple[Any, ...]]] = []
    for method, args in calls:
        if method == "scalars" and merged and merged[-1][0] == "scalars":
            merged[-1] = ("scalars", (merged[-1][1][0] + args[0],))
        else:
            merged.append((method, args))
    return merged


def last_logged_step(run_dir: Path) -> int:
    """The largest step in the run's metrics.jsonl (-1 if none): what an earlier attempt already sent."""
    try:
        events = read_events(run_dir)
    except OSError:
        return -1
    return max((e["step"] for e in events if isinstance(e.get("step"), int)), default=-1)


class _Worker:
    """One tool's thread: opens the tool, waits for Tracking's verdict on the start (every tool started: go on; one
    did not: undo this one's start), then runs the calls queued for it in order, gathered for BATCH_S seconds (the
    scalars of several metrics lines go to the tool in one call: one MLflow request, not one a line). After the
    start, the first exception drops the tool (one warning); what is queued after is discarded."""

    def __init__(self, name: str, adapter: Any, on_open: Callable[[str, dict[str, Any]], None]) -> None:
        self.name, self.adapter, self.on_open = name, adapter, on_open
        self.calls: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self.failed = False
        self.started = threading.Event()  # open() returned or raised
        self.start_error: Exception | None = None
        self.undo_error: Exception | None = None
        self.verdict: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"track-{name}", daemon=True)
        self.thread.start()

    def put(self, method: str, *args: Any) -> None:
        if not self.failed:
            self.calls.put((method, args))

    def _run(self) -> None:
        try:
            ids = self.adapter.open() or {}
        except Exception as e:  # noqa: BLE001 - Tracking reports it: the run ends before it trains
            self.start_error, self.failed = e, True
            return self.started.set()
        self.started.set()
        if not self.verdict.get():  # another tool did not start: the run ends, and this tool's start is undone
            self.failed = True
            try:
                return self.adapter.undo()
            except Exception as e:  # noqa: BLE001 - Tracking reports it
                self.undo_error = e
                return None
        try:
            self.on_open(self.name, ids)
        except Exception as e:  # noqa: BLE001 - from here on, a failure drops the tool, never the run
            return self._drop(e)
        finished = False
        while not finished:
            batch = self._gather()
            finished = batch[-1] is None
            try:
                for method, args in _merge_scalars([c for c in batch if c is not None]):
                    getattr(self.adapter, method)(*args)
            except Exception as e:  # noqa: BLE001
                return self._drop(e)

    def _gather(self) -> list[tuple[str, tuple[Any, ...]] | None]:
        """The next call, and whatever else arrives within BATCH_S of it (None: the run has ended)."""
        batch = [self.calls.get()]
        deadline = time.monotonic() + BATCH_S
        while batch[-1] is not None:
            try:
                batch.append(self.calls.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def where(self) -> str:
        where = getattr(self.adapter, "where", None)
        return where() if callable(where) else self.name

    def start_failure(self) -> str:
        """Why this tool did not start, naming where it was to write."""
        if self.start_error is None:
            return f"--track {self.name}: did not start within {START_TIMEOUT_S:g}s at {self.where()}"
        return f"--track {self.name}: could not start at {self.where()} ({_reason(self.start_error, 300)})"

    def _drop(self, e: Exception) -> None:
        self.failed = True
        warn(f"tracker {self.name} failed ({_reason(e)}); dropped, training goes on")
        try:
            self.adapter.abandon()
        except Exception:  # noqa: BLE001, S110 - already reported
            pass

    def finish(self, deadline: float) -> None:
        self.calls.put(None)
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            warn(f"tracker {self.name} did not finish within {CLOSE_TIMEOUT_S:.0f}s; its last events may be missing")


class Tracking:
    """What RunDir feeds: the config, each metrics line, the summary, the close. Made before the run directory is
    written: it starts every tool (at most START_TIMEOUT_S), or raises TrackerStartError with the start undone."""

    def __init__(self, track: str, run_dir: Path, project: str, artifacts: bool,
                 adapters: dict[str, Callable[..., Any]] | None = None) -> None:
        self.run_dir, self.artifacts = run_dir, artifacts
        self.sent_through = last_logged_step(run_dir)  # a resume: these steps were sent by an earlier attempt
        self.step = max(self.sent_through, 0)
        self.config: dict[str, Any] | None = None
        self.closing = False  # the summary's close was queued
        self.state_lock = threading.Lock()
        state = self._read_state()
        make = adapters or ADAPTERS
        made = next((p for p in reversed((run_dir, *run_dir.parents)) if not p.exists()), None)
        before = _snapshot(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # the tools write in it (TensorBoard, W&B) or beside it (MLflow)
        self.workers = [_Worker(name, make[name](run_dir=run_dir, project=project, saved=state.get(name, {})),
                                self._remember) for name in track.split(",")]
        self._await_start(made, before)

    # -- the run's side (called on the training thread: cheap, never blocks) --------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config

    def event(self, event: str, fields: dict[str, Any]) -> None:
        step = fields.get("step")
        if isinstance(step, int):
            if step <= self.sent_through and event != "resume":
                return  # trained again after a resume: the earlier attempt sent this step
            self.step = max(self.step, step)
        if event in ("train", "eval"):  # the step is the x-axis; the budget spent is its own scalar
            self._send("scalars", [(self.step, namespaced(event, fields), time.time())])
        elif event == "start":
            if not fields.get("attempt") and self.config is not None:  # a resume keeps the first attempt's
                self._send("hparams", self._hparams(fields))
            self._send("text", self.step, "start", f"{fields.get('model')} on {fields.get('device')}, "
                       f"{fields.get('world_size')} process(es), attempt {fields.get('attempt')}")
        elif event == "stage":
            self._send("text", self.step, "stage", _stage_text(fields))
            self._send("tag", "stage", f"{fields.get('stage')}: {fields.get('image_size')} px")
        elif event in ("stage_skipped", "resume", "resume_world") or event in ENDS:
            text = fields.get("message") or ", ".join(f"{k} {v}" for k, v in fields.items())
            self._send("text", self.step, event, str(text))

    def write_summary(self, summary: dict[str, Any]) -> None:
        reason = str(summary.get("stop_reason", "budget"))
        files = [self.run_dir / "summary.json", self.run_dir / "config.json"]
        if self.artifacts and (self.run_dir / "model.safetensors").exists():
            files.append(self.run_dir / "model.safetensors")
        self._send("tag", "stop_reason", reason)
        self._send("summary", {k: v for k, v in _flat(summary).items()
                               if isinstance(v, (int, float)) and not k.startswith("state.")},
                   [p for p in files if p.exists()])
        self._send("close", ENDS.get(reason, "FAILED"))
        self.closing = True

    def close(self) -> None:
        """Wait (at most CLOSE_TIMEOUT_S in all) for each tool to drain and close. A run that ends without a
        summary (an unexpected error) closes its tools as failed."""
        if not self.closing:
            self._send("close", "FAILED")
            self.closing = True
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for w in self.workers:
            w.finish(deadline)

    # -- internals ---------------------------------------------------------------------------------------------
    def _await_start(self, made: Path | None, before: dict[Path, str]) -> None:
        """Every tool started: each goes on. Otherwise each undoes its start, the files it wrote are removed (what
        ``made`` or ``before`` says was not there), and TrackerStartError names the tools that did not start."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for w in self.workers:
            w.started.wait(max(0.0, deadline - time.monotonic()))
        failed = [w for w in self.workers if w.start_error is not None or not w.started.is_set()]
        for w in self.workers:
            w.verdict.put(not failed)
        if not failed:
            return
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for w in self.workers:
            if w.started.is_set():
                w.thread.join(max(0.0, deadline - time.monotonic()))
        _restore(self.run_dir, before, made)
        lines = [w.start_failure() for w in failed] + [
            f"--track {w.name}'s start was not undone ({_reason(w.undo_error)})" for w in self.workers if w.undo_error]
        raise TrackerStartError("; ".join(lines))

    def _send(self, method: str, *args: Any) -> None:
        for w in self.workers:
            w.put(method, *args)

    def _hparams(self, start: dict[str, Any]) -> dict[str, Any]:
        """The resolved configuration (minus the class list) and what the run resolved at start: parameters,
        device, world size, global batch, the concrete curriculum plan."""
        config = {k: v for k, v in (self.config or {}).items() if k not in ("classes", "preset_overrides")}
        stages = ", ".join(f"{st['image_size']}px@" + _stage_start(st) for st in start.get("stages", []))
        resolved = {k: start.get(k) for k in ("params", "device", "amp", "step_mode", "fused_ffn", "world_size",
                                             "global_batch", "train_images", "val_images", "eval_size")}
        return _flat({**config, **resolved, "stages": stages})

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, name: str, ids: dict[str, Any]) -> None:
        """A tool's run id, kept so that a resume continues the same tracked run (written atomically)."""
        if not ids:
            return
        with self.state_lock:
            state = self._read_state()
            state[name] = ids
            write_json_atomic(self.run_dir / STATE_FILE, state)


class TensorBoard:
    """RUN_DIR/tb/, so ``tensorboard --logdir runs`` shows every run."""

    def __init__(self, run_dir: Path, project: str, saved: dict[str, Any]) -> None:
        self.log_dir = run_dir / "tb"
        self.writer: Any = None

    def where(self) -> str:
        return str(self.log_dir)

    def open(self) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)
        return {"log_dir": "tb"}

    def hparams(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, {"val/top1": 0.0, "val/top5": 0.0, "train/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, rows: list[Row]) -> None:
        for step, values, wall in rows:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step, walltime=wall)

    def text(self, step: int, key: str, line: str) -> None:
        self.writer.add_text(f"events/{key}", line, global_step=step)

    def tag(self, key: str, value: str) -> None:
        pass  # the stage and the stop reason are in the texts

    def summary(self, values: dict[str, float], files: list[Path]) -> None:
        self.writer.add_text("summary", "\n".join(f"    {k}: {v}" for k, v in sorted(values.items())))

    def close(self, status: str) -> None:
        self.writer.close()

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def undo(self) -> None:
        self.abandon()  # its new events file is removed with the rest of what the start wrote


class MLflow:
    """MLFLOW_TRACKING_URI when set, else an SQLite store beside the run directory (RUNS/mlflow.db, artifacts in
    RUNS/mlartifacts); experiment --track-project, run name the run directory's name. A resume continues with the
    store its first attempt used (track.json)."""

    def __init__(self, run_dir: Path, project: str, saved: dict[str, Any]) -> None:
        self.run_dir, self.project, self.saved = run_dir, project, saved
        self.client: Any = None
        self.run_id: str | None = saved.get("run_id")
        self.db = run_dir.resolve().parent / "mlflow.db"  # the default store
        self.uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.db}"
        self.resumed_from: str | None = None  # a resumed run's status before this attempt set it RUNNING
        self.new_db = False  # this start made the default store

    def where(self) -> str:
        if self.saved.get("tracking_uri"):
            return f"{self.uri} (this run's track.json)"
        return f"MLFLOW_TRACKING_URI={self.uri}" if os.environ.get("MLFLOW_TRACKING_URI") else self.uri

    def open(self) -> dict[str, Any]:
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # not its notes on making tables
        self.new_db = self.uri == f"sqlite:///{self.db}" and not self.db.exists()
        self.client = MlflowClient(tracking_uri=self.uri)  # makes the store (refuses a file store, an unknown URI)
        if self.run_id:
            self.resumed_from = self.client.get_run(self.run_id).info.status
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(self.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                self.project, artifact_location=None if self.uri != f"sqlite:///{self.db}" else
                (self.db.parent / "mlartifacts").as_uri())
            self.run_id = self.client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def hparams(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, rows: list[Row]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), int(wall * 1000), step) for step, values, wall in rows
                   for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def text(self, step: int, key: str, line: str) -> None:
        self.client.set_tag(self.run_id, f"event.{key}", f"step {step}: {line}")

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def summary(self, values: dict[str, float], files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def abandon(self) -> None:
        pass  # nothing held open: the run stays as the server last saw it

    def undo(self) -> None:
        """A resumed run gets its status back; a new one is deleted (MLflow's soft delete), and the default store
        too if this start made it. An experiment this start made in another store stays, empty."""
        if self.resumed_from:
            self.client.update_run(self.run_id, status=self.resumed_from)
        elif self.run_id:
            self.client.delete_run(self.run_id)
            if self.new_db:
                self.db.unlink(missing_ok=True)


class WandB:
    """W&B by its own environment (WANDB_MODE=offline works without a network); files under RUN_DIR/wandb/."""

    def __init__(self, run_dir: Path, project: str, saved: dict[str, Any]) -> None:
        self.run_dir, self.project, self.saved = run_dir, project, saved
        self.run: Any = None

    def where(self) -> str:
        mode = os.environ.get("WANDB_MODE") or "online"
        if mode in ("offline", "dryrun", "disabled"):
            return f"W&B {mode} in {self.run_dir / 'wandb'}"
        return f"W&B {mode} ({os.environ.get('WANDB_BASE_URL') or 'https://api.wandb.ai'}, project {self.project})"

    def open(self) -> dict[str, Any]:
        import wandb

        self.run = wandb.init(project=self.project, name=self.run_dir.name, id=self.saved.get("id"),
                              resume="allow", dir=str(self.run_dir), reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        return {"id": self.run.id, "project": self.project}

    def hparams(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def scalars(self, rows: list[Row]) -> None:
        for step, values, _ in rows:
            self.run.log(values, step=step)

    def text(self, step: int, key: str, line: str) -> None:
        self.run.summary[f"event/{key}"] = f"step {step}: {line}"

    def tag(self, key: str, value: str) -> None:
        self.run.summary[key] = value

    def summary(self, values: dict[str, float], files: list[Path]) -> None:
        import wandb

        self.run.summary.update({f"final/{k}": v for k, v in values.items()})
        artifact = wandb.Artifact(f"{self.run_dir.name}-files", type="run-files")
        for path in files:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def abandon(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)

    def undo(self) -> None:
        """Finished as failed: offline, its files are removed with the rest of what the start wrote; online, the run
        this start made (or resumed) stays on the W&B server, failed."""
        self.abandon()


ADAPTERS: dict[str, Callable[..., Any]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
