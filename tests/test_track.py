"""--track: TensorBoard, MLflow and W&B receive the run's one event stream; each is read back with its own reader
(EventAccumulator, MlflowClient, `wandb leet inspect`) and compared with metrics.jsonl. Runs in this process use the
fake clock (conftest.FakeTime); the two that need a run in its own process (killed by the test, or outliving a
server the test kills) have budgets far longer than what they wait for."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainer.checkpoint import load_latest
from trainer.cli import main
from trainer.track import last_logged_step

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "8", "--workers", "1",
        "--log-every", "0.5"]


@pytest.fixture(autouse=True)
def local_trackers(monkeypatch, tmp_path):
    """No network and no user settings: W&B offline, MLflow's default store (beside the run directory)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _events(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in lines if e["event"] == kind]


def _tb(out: Path) -> EventAccumulator:
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    return ea


def _tb_hparams(ea: EventAccumulator) -> dict:
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            return {k: v.string_value or v.number_value or v.bool_value
                    for k, v in data.session_start_info.hparams.items()}
    raise AssertionError("no hparams in the TensorBoard folder")


def _mlflow(out: Path) -> tuple[MlflowClient, str]:
    state = json.loads((out / "track.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def _wandb_records(out: Path) -> tuple[dict, list[dict]]:
    """W&B's own reader of its offline transaction log: the run's state and config, and its history rows."""
    run_dir = next((out / "wandb").glob("offline-run-*"))
    summary = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=60, check=True)
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=60, check=True)
    rows = [json.loads(line)["history"] for line in records.stdout.splitlines()
            if line.startswith("{") and json.loads(line).get("type") == "history"]
    return json.loads(summary.stdout), [{**row["item"], "_step_num": row["step"]["num"]} for row in rows]


def test_the_three_trackers_receive_the_metrics_lines(tmp_path, colour_dataset, capsys, fake_time):
    """An 8-s run of 1-s steps tracked by all three: each holds exactly metrics.jsonl's steps and values, the
    config as parameters, and the finished state."""
    out = tmp_path / "runs" / "tracked"
    code = main(["--data", str(colour_dataset), *TINY, "--budget", "8s", "--out", str(out),
                 "--track", "tensorboard,mlflow,wandb", "--track-project", "tests"])
    assert code == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err
    train, evals = _events(out, "train"), _events(out, "eval")
    assert len(train) >= 3 and evals
    config = json.loads((out / "config.json").read_text())
    start = _events(out, "start")[0]

    # TensorBoard: the same steps and values (stored as float32), and the resolved configuration as hparams
    ea = _tb(out)
    for field, tag, events in (("loss", "train/loss", train), ("lr", "train/lr", train),
                               ("images_per_sec", "train/images_per_sec", train), ("top1", "val/top1", evals)):
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [e["step"] for e in events], tag
        assert [v for _, v in got] == pytest.approx([e[field] for e in events], rel=1e-6), tag
    assert [e.value for e in ea.Scalars("budget/elapsed_s")] == pytest.approx([e["elapsed_s"] for e in train])
    hp = _tb_hparams(ea)
    assert hp["model"] == "vit_local_test_patch16" and hp["peak_lr"] == pytest.approx(config["peak_lr"])
    assert hp["global_batch"] == start["global_batch"] and hp["stages"] == "32px@epoch0"
    assert hp["versions.torch"] == config["versions"]["torch"]

    # MLflow (a local SQLite store beside the run directory): params, the metric histories, the artifacts
    client, run_id = _mlflow(out)
    assert client.tracking_uri == f"sqlite:///{out.parent.resolve()}/mlflow.db"
    run = client.get_run(run_id)
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params["model"] == "vit_local_test_patch16" and float(run.data.params["peak_lr"]) == \
        pytest.approx(config["peak_lr"])
    assert run.data.tags["stop_reason"] == "budget"
    for field, key, events in (("loss", "train/loss", train), ("lr", "train/lr", train), ("top5", "val/top5", evals)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(e["step"], e[field]) for e in events], key
    assert {a.path for a in client.list_artifacts(run_id)} == {"summary.json", "config.json"}

    # W&B offline: config and history, read back with wandb's own inspector
    state, rows = _wandb_records(out)
    assert state["state"] == "finished" and state["name"] == "tracked" and state["project"] == "tests"
    assert state["config"]["model"] == "vit_local_test_patch16" and state["config"]["stages"] == "32px@epoch0"
    losses = [(r["_step_num"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert losses == [(e["step"], e["loss"]) for e in train]
    assert [r["val/top1"] for r in rows if "val/top1" in r] == [e["top1"] for e in evals]


def test_a_killed_run_resumes_into_the_same_tracked_run(tmp_path, colour_dataset, fake_time):
    """SIGKILL a tracked run in its own process after a checkpoint and 20 more steps, resume it (the same command):
    one MLflow run, FINISHED, whose step series never repeats a step; one TensorBoard folder, a file per attempt."""
    out = tmp_path / "runs" / "killed"
    # killed long before its budget (the wait below): the budget is slack, not a wait
    command = [sys.executable, "-m", "trainer", "--data", str(colour_dataset), *TINY, "--budget", "60s",
               "--ckpt-every", "2s", "--out", str(out), "--track", "tensorboard,mlflow"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # a checkpoint, then more steps logged after it
            assert proc.poll() is None, proc.communicate()
            if (out / "metrics.jsonl").exists() and (out / "track.json").exists():
                ckpts = _events(out, "checkpoint")
                tracked = len(json.loads((out / "track.json").read_text())) == 2  # both tools opened
                if tracked and ckpts and any(e["step"] > ckpts[0]["step"] + 20 for e in _events(out, "train")):
                    break
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    client, run_id = _mlflow(out)
    # Resumed in this process, on the fake clock: it trains again from its checkpoint to where the killed attempt's
    # lines end (how far that is depends on the killed attempt's real speed; its eval lines, one an epoch, reach
    # further than its train lines, one every few seconds), then about 40 steps more: what is left of the budget is
    # spread over that many steps, settling ones too, and evaluations cost next to nothing.
    newest = load_latest(out / "checkpoints").payload
    logged = last_logged_step(out)  # what the resumed attempt's tracking takes as sent
    fake_time.step_s = fake_time.settle_s = (60 - newest["budget_spent_s"]) / (logged - newest["state"]["step"] + 40)
    fake_time.eval_batch_s = 1e-3
    assert main(command[3:]) == 0
    resume = _events(out, "resume")
    assert len(resume) == 1
    assert _mlflow(out)[1] == run_id  # the same tracked run
    runs = client.search_runs([client.get_experiment_by_name("vitbudget").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)]
    assert steps == sorted(set(steps))  # increasing: the steps trained again after the resume are not sent twice
    new = [e["step"] for e in _events(out, "train") if e["step"] > logged]  # the resumed attempt's, past the killed
    assert new and steps[-len(new):] == new, (steps[-5:], new)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2  # one folder, a file per attempt
    tb_steps = [e.step for e in _tb(out).Scalars("train/loss")]
    assert tb_steps == sorted(set(tb_steps)) and tb_steps[-1] == steps[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_mlflow_server_that_goes_away_costs_one_warning_not_the_run(tmp_path, colour_dataset):
    """A run (its own process) tracking to an MLflow server that is killed once it has taken metrics: exit 0,
    exactly one warning line, and the run trains and evaluates on to its budget."""
    port = _free_port()
    # the server's store and artifacts (by default ./mlartifacts, beside where it runs) in this test's folder
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
                               str(tmp_path / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own process group: the server and its uvicorn worker
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.3)
        out = tmp_path / "run"
        # no retries: the killed server refuses at once; a generous timeout: a single-worker server on a busy 2-core
        # machine (the run trains beside it) took over 3 s to answer a request before it was killed
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
        # it must outlive the kill: measured on a busy 2-core machine, its first line at 11 s of the budget (imports
        # count), the server's first batch of metrics (5 s later) and the kill at 15 s; 45 s is 3 times that
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "--data", str(colour_dataset), *TINY,
                                 "--budget", "45s", "--out", str(out), "--track", "mlflow"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        while time.monotonic() < deadline + 60:  # the server has taken some of the run's metrics
            assert proc.poll() is None, proc.communicate()
            if (out / "track.json").exists() and client.get_metric_history(_mlflow(out)[1], "train/loss"):
                break
            time.sleep(0.3)
        os.killpg(server.pid, signal.SIGKILL)  # the server stops answering mid-run: connections are refused
        server.wait()
        killed_at = _events(out, "train")[-1]["elapsed_s"]
        _, err = proc.communicate(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert proc.returncode == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tracker mlflow failed" in warnings[0], err
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "budget"
    assert _events(out, "train")[-1]["elapsed_s"] > killed_at and _events(out, "eval")  # trained on


@pytest.mark.parametrize(("flags", "needle"), [
    (["--track", "nope"], "--track: unknown tool 'nope'"),
    (["--track", "tensorboard,wandb"], '--track wandb: the wandb package is not installed (pip install -e ".[track]")'),
])
def test_bad_track_flags_exit_2_and_write_nothing(tmp_path, colour_dataset, capsys, monkeypatch, flags, needle):
    """An unknown tool, or one whose package is missing: exit 2, one line naming it, no run folder, no MLflow store."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    out = tmp_path / "run"
    assert main(["--data", str(colour_dataset), *TINY, "--budget", "5s", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


class _Recorder:
    """A tool that records each call it gets in ``calls[name]``; ``fails`` (a method's name) raises."""

    def __init__(self, name: str, calls: dict[str, list], fails: str = "", **_: object) -> None:
        self.name, self.calls, self.fails = name, calls, fails
        calls.setdefault(name, [])

    def open(self) -> dict:
        return {"id": self.name}

    def __getattr__(self, method: str):
        def record(*args: object) -> None:
            if method == self.fails:
                raise ConnectionRefusedError("refused")
            self.calls[self.name].append((method, args))
        return record


def _scalar_rows(calls: list) -> list:
    return [row[:2] for method, args in calls if method == "scalars" for row in args[0]]


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path):
    """The adapter layer alone: one tool raises on its first scalars, the other still gets everything, and close
    returns (each tool has its own thread, so one never waits on another)."""
    from trainer.track import Tracking

    calls: dict[str, list] = {}
    tracking = Tracking("good,bad", tmp_path, "p", False,
                        adapters={"good": lambda **kw: _Recorder("good", calls, **kw),
                                  "bad": lambda **kw: _Recorder("bad", calls, fails="scalars")})
    for step in (1, 2):
        tracking.event("train", {"step": step, "loss": 1.0 / step, "elapsed_s": step})
    tracking.close()
    assert _scalar_rows(calls["good"]) == [(1, {"train/loss": 1.0, "budget/elapsed_s": 1}),
                                           (2, {"train/loss": 0.5, "budget/elapsed_s": 2})]
    assert calls["good"][-1] == ("close", ("FAILED",))  # closed without a summary: an unexpected end
    assert [c[0] for c in calls["bad"]] == ["abandon"]  # dropped at its first failure, nothing after
    assert json.loads((tmp_path / "track.json").read_text()) == {"good": {"id": "good"}, "bad": {"id": "bad"}}


def test_a_resumed_run_sends_only_the_steps_past_the_killed_attempts_last_line(tmp_path):
    """The killed attempt logged train lines to step 10 and eval lines (one an epoch) to step 20; the resumed one
    trains again from step 4: its lines from step 21 on are sent, each at its own step, the x-axis only growing."""
    from trainer.rundir import RunDir
    from trainer.track import Tracking

    killed = RunDir(tmp_path)
    for step in range(2, 21, 2):
        killed.log("eval", step=step, top1=0.5)
        if step <= 10:
            killed.log("train", step=step, loss=1.0)
    killed.close()
    calls: dict[str, list] = {}
    tracking = Tracking("rec", tmp_path, "p", False, adapters={"rec": lambda **kw: _Recorder("rec", calls, **kw)})
    tracking.event("resume", {"step": 4})
    for step in range(5, 25):
        tracking.event("train", {"step": step, "loss": 1.0})
        if step % 2 == 0:
            tracking.event("eval", {"step": step, "top1": 0.5})
    tracking.close()
    rows = _scalar_rows(calls["rec"])
    assert [s for s, values in rows if "train/loss" in values] == list(range(21, 25))
    assert [s for s, values in rows if "val/top1" in values] == [22, 24]
    assert [c[1] for c in calls["rec"] if c[0] == "text"][0] == (20, "resume", "step 4")


def _files(folder: Path) -> dict[str, bytes | str]:
    """A folder's files (their bytes) and links (their targets), by relative path."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def _no_login(*_: object, **__: object) -> None:
    """wandb.init in online mode without an API key (what W&B raises when no `wandb login` was made)."""
    import wandb

    raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")


@pytest.mark.parametrize(("track", "refused", "needle"), [
    ("mlflow", "mlflow", "--track mlflow: could not start at MLFLOW_TRACKING_URI=file:"),
    ("tensorboard,mlflow,wandb", "mlflow", "--track mlflow: could not start at MLFLOW_TRACKING_URI=file:"),
    ("tensorboard,mlflow,wandb", "wandb", "--track wandb: could not start at W&B online (https://api.wandb.ai, "
                                          "project vitbudget) (UsageError: No API key configured"),
])
def test_a_tracker_that_does_not_start_ends_the_run_before_it_trains(tmp_path, colour_dataset, capfd, monkeypatch,
                                                                     track, refused, needle):
    """MLflow 3 refusing a file store, or W&B online without a login: exit 2 and one line naming the tool and its
    store, before any training step; what the tools that did start wrote (TensorBoard's and W&B's files in the run
    directory, the MLflow store beside it) is removed with the folders the start made."""
    import wandb

    store = tmp_path / "file-store"
    if refused == "mlflow":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    else:
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setattr(wandb, "init", _no_login)
    monkeypatch.setattr("trainer.cli.train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "runs" / "run"
    assert main(["--data", str(colour_dataset), *TINY, "--budget", "30s", "--out", str(out), "--track", track]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vit-train: error: ") and needle in err, err
    assert not (tmp_path / "runs").exists() and not store.exists()


def test_a_resumed_run_whose_tracker_does_not_start_is_left_as_it_was(tmp_path, colour_dataset, capfd, monkeypatch,
                                                                      fake_time):
    """A stopped run resumed where W&B does not start (online, no login), then where MLflow does not (its run gone
    from the store): exit 2 each time, and the runs folder is as it was (TensorBoard's new events file and W&B's new
    offline run removed, W&B's latest-run and debug links pointed back, track.json unchanged), the MLflow run back
    to its status."""
    import wandb
    from mlflow.exceptions import MlflowException

    out = tmp_path / "runs" / "run"
    flags = ["--data", str(colour_dataset), *TINY, "--budget", "4s", "--ckpt-every", "1s", "--out", str(out)]
    assert main([*flags, "--track", "tensorboard,mlflow,wandb"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "stop_reason": "stopped"}))  # as if SIGTERM'd: resumable
    client, run_id = _mlflow(out)
    before = _files(out.parent)
    before.pop("mlflow.db")  # the store beside the run directory: the run's status is compared instead
    capfd.readouterr()

    def gone(*_: object) -> None:
        raise MlflowException(f"Run with id={run_id} not found")

    for refused, needle in (("wandb", "--track wandb: could not start at W&B online"),
                            ("mlflow", f"--track mlflow: could not start at sqlite:///{out.parent}/mlflow.db (this "
                                       f"run's track.json) (MlflowException: Run with id={run_id} not found)")):
        with monkeypatch.context() as m:
            if refused == "wandb":
                m.setenv("WANDB_MODE", "online")
                m.setattr(wandb, "init", _no_login)
            else:
                m.setattr(MlflowClient, "get_run", gone)
            assert main(flags) == 2  # a resume: its tools are the first attempt's (config.json)
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        after = _files(out.parent)
        assert after.pop("mlflow.db") and after == before, refused
        assert client.get_run(run_id).info.status == "FINISHED"


class _Tool:
    """A fake tool: ``open`` as given; records its undo."""

    def __init__(self, name: str, open_: object, undone: list, **_: object) -> None:
        self.name, self.open_, self.undone = name, open_, undone

    def where(self) -> str:
        return f"{self.name}-store"

    def open(self) -> dict:
        return self.open_()

    def undo(self) -> None:
        self.undone.append(self.name)


def _refused() -> dict:
    raise ConnectionRefusedError("refused")


def _slow() -> dict:
    time.sleep(1.0)
    return {"id": "slow"}


@pytest.mark.parametrize(("open_", "needle"), [
    (_refused, "--track bad: could not start at bad-store (ConnectionRefusedError: refused)"),
    (_slow, "--track bad: did not start within 0.3s at bad-store"),
])
def test_a_tool_that_does_not_start_undoes_the_others(tmp_path, monkeypatch, open_, needle):
    """The adapter layer alone: a tool whose open raises, or takes longer than START_TIMEOUT_S, raises
    TrackerStartError naming it and its store; the tool that did start undoes its start, no track.json is written,
    and the folders the start made are removed."""
    from trainer import track

    monkeypatch.setattr(track, "START_TIMEOUT_S", 0.3)
    undone: list[str] = []
    adapters = {"good": lambda **kw: _Tool("good", lambda: {"id": "good"}, undone),
                "bad": lambda **kw: _Tool("bad", open_, undone)}
    with pytest.raises(track.TrackerStartError) as e:
        track.Tracking("good,bad", tmp_path / "new" / "run", "p", False, adapters=adapters)
    assert str(e.value) == needle
    assert undone[0] == "good" and not (tmp_path / "new").exists()
