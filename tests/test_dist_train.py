"""vit-train data-parallel on the CPU: two gloo processes (as torchrun starts them) train one run together.

Each rank runs the real CLI in its own process; a small hook records what its Trainer ended with (step, weights,
its reader's shard), so the test can compare the ranks. Runs that end at their budget do so on each rank's fake
clock (conftest.FakeTime: every rank's steps cost the same fake time, rank 0's decides), so where they stop and which
stages they reach is the same on a loaded machine; the SIGTERM test's ranks run on the real clock, with a budget far
longer than its wait. Timeouts make a hang fail instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.conftest import make_colour_dataset

TINY = ["--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "2", "--workers", "1",
        "--log-every", "1"]


def _rank_main(rank: int, port: int, argv: list[str], work: str, step_s: float | None) -> None:
    """One rank: torchrun's variables, one thread, its own working folder and output files, then the CLI (on a fake
    clock charging ``step_s`` a step, if given)."""
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    cwd = Path(work, f"cwd{rank}")
    os.chdir(cwd)  # anything written to a relative path would land here
    sys.stdout = open(Path(work, f"rank{rank}.out"), "w", buffering=1)  # noqa: SIM115 (closed at exit)

    from trainer import cli, loop

    record: dict = {}
    run = loop.Trainer.run

    def recorded_run(self: loop.Trainer) -> dict:
        try:
            return run(self)
        finally:
            spec = self.train_batches.spec
            record.update(step=self.state.step, epoch=self.state.epoch, images_seen=self.state.images_seen,
                          shard=[spec.shard_id, spec.num_shards], lr=self.state.lr,
                          weights=[float(p.double().sum()) for p in self.net.parameters()])

    loop.Trainer.run = recorded_run  # type: ignore[method-assign]
    if step_s is not None:
        from tests.conftest import FakeTime, run_on_fake_time

        run_on_fake_time(setattr, FakeTime(step_s=step_s))
    record["code"] = cli.main(argv)
    Path(work, f"rank{rank}.json").write_text(json.dumps(record))


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], work: Path, step_s: float | None = None):
    for rank in range(2):
        (work / f"cwd{rank}").mkdir(parents=True, exist_ok=True)
    return mp.start_processes(_rank_main, args=(_free_port(), argv, str(work), step_s), nprocs=2, join=False,
                              start_method="spawn")


def _join(ctx, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    for p in ctx.processes:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert [p.exitcode for p in ctx.processes] == [0, 0]  # each rank's own exit code is in its record


def _results(work: Path) -> list[dict]:
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 60 train images: 15 steps of 2 per rank per epoch; 15 val images: shards of 8 and 7
    return make_colour_dataset(tmp_path_factory.mktemp("dist-data"), train_per_class=20, val_per_class=5)


def test_two_processes_train_one_run_and_stop_together_at_the_budget(tmp_path, data, monkeypatch):
    """Two gloo ranks, 16:16:2, a 20-s budget of 0.25-s steps: both stop at the same step with the same weights and
    lr, each read its own half, the stage change at epoch 2 was entered together, each val image was evaluated once,
    and only rank 0 wrote, printed or tracked anything."""
    out = tmp_path / "run"
    track = ["--track", "tensorboard,mlflow"] if _installed("tensorboard", "mlflow") else []
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, beside the run directory
    # a stage change on the way (16 then 32 px): the ranks enter it together and DDP is rebuilt around the model
    ctx = _launch(["--data", str(data), *TINY, "--curriculum", "16:16:2", "--budget", "20s", "--out", str(out),
                   *track], tmp_path, step_s=0.25)
    _join(ctx)
    ranks = _results(tmp_path)
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[0]["step"] == ranks[1]["step"] > 0  # the budget stopped both at the same step
    assert [r["shard"] for r in ranks] == [[0, 2], [1, 2]]  # each rank reads its own half of every epoch
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["lr"] == ranks[1]["lr"]  # one model, one lr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["world_size"] == 2 and summary["global_batch"] == 4
    assert summary["stages_reached"] == 2 and summary["image_size"] == 32
    assert summary["steps"] == ranks[0]["step"] and summary["images_seen"] == 4 * summary["steps"]
    assert summary["elapsed_s"] <= 20
    assert [(e["stage"], e["epoch"], e["image_size"]) for e in _events(out) if e["event"] == "stage"] == [
        (0, 0, 16), (1, 2, 32)]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 4
    assert config["peak_lr"] == pytest.approx(config["lr"] * 4 / 512)  # the lr rule reads the global batch
    events = _events(out)
    assert [e["event"] for e in events].count("start") == 1  # one writer of metrics.jsonl
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(e["images"] == 15 for e in evals)  # the sharded evaluation counts each val image once
    # only rank 0 wrote or printed anything
    assert not any((tmp_path / "cwd0").iterdir()) and not any((tmp_path / "cwd1").iterdir())
    assert (tmp_path / "rank1.out").read_text() == ""
    assert "done: val top1" in (tmp_path / "rank0.out").read_text()
    if track:  # rank 0 alone tracks: one TensorBoard event file, one MLflow run
        assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("vitbudget").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == len(
            [e for e in events if e["event"] == "train"])


def test_a_sigterm_to_one_rank_stops_both_and_the_checkpoint_resumes_in_one_process(tmp_path, data, capsys,
                                                                                    fake_time):
    """SIGTERM to rank 1 alone, 10 s into a run (real clock, 60-s budget): both ranks exit 128+15 at the same step,
    rank 0 writes the stopped summary and a checkpoint of that step; `--resume` in this one process (fake clock)
    finishes the budget from it, counting its images, and restarts a part-done epoch from its beginning."""
    out = tmp_path / "run"
    ctx = _launch(["--data", str(data), *TINY, "--budget", "60s", "--out", str(out)], tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # a few seconds into training, signal rank 1 alone
        events = _events(out) if (out / "metrics.jsonl").exists() else []
        if any(e["event"] == "train" and e["elapsed_s"] >= 10 for e in events):
            break
        time.sleep(0.2)
    os.kill(ctx.processes[1].pid, signal.SIGTERM)
    _join(ctx)
    ranks = _results(tmp_path)
    assert [r["code"] for r in ranks] == [128 + signal.SIGTERM] * 2
    assert ranks[0]["step"] == ranks[1]["step"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "stopped" and summary["signal"] == "SIGTERM"
    assert (tmp_path / "rank1.out").read_text() == ""

    import torch

    checkpoints = sorted((out / "checkpoints").iterdir())
    stopped = torch.load(checkpoints[-1], weights_only=True)
    assert stopped["state"]["step"] == ranks[0]["step"] and stopped["config"]["world_size"] == 2

    from trainer.cli import main

    assert main(["--resume", str(out)]) == 0  # the 2-process checkpoint, resumed in this one process
    printed = capsys.readouterr().out
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["stop_reason"] == "budget" and resumed["world_size"] == 1 and resumed["attempts"] == 2
    assert resumed["steps"] > stopped["state"]["step"]
    assert resumed["images_seen"] == stopped["state"]["images_seen"] + 2 * (resumed["steps"] - stopped["state"]["step"])
    if stopped["state"]["epoch_step"]:  # stopped mid-epoch: the shards changed, so that epoch restarts
        assert f"epoch {stopped['state']['epoch']} restarts from its beginning" in printed
        assert any(e["event"] == "resume_world" for e in _events(out))


def test_two_processes_train_from_webdataset_shards(tmp_path, data, monkeypatch):
    """Two gloo ranks on WebDataset shards (a 15-s budget of 0.25-s steps): the same steps and weights, disjoint
    halves, and each val image evaluated once."""
    from tests.test_wds import write_shards

    monkeypatch.setenv("VITBUDGET_CACHE", str(tmp_path / "cache"))  # the ranks inherit it: one index cache
    shards = write_shards(data, tmp_path / "shards")
    out = tmp_path / "run"
    _join(_launch(["--data", f"wds:{shards}", *TINY, "--budget", "15s", "--out", str(out)], tmp_path, step_s=0.25))
    ranks = _results(tmp_path)
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[0]["step"] == ranks[1]["step"] > 0 and [r["shard"] for r in ranks] == [[0, 2], [1, 2]]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    evals = [e for e in _events(out) if e["event"] == "eval"]
    assert evals and all(e["images"] == 15 for e in evals)  # each val image once over the two ranks
