"""trainer/dist.py: one process is a world of one; two gloo processes agree on flags, counts and rank 0's clock."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from trainer import dist as tdist
from trainer.agreement import STOP_BUDGET, STOP_SIGNAL


def test_without_torchrun_the_world_is_one_process_and_collectives_return_their_input():
    world = tdist.world_from_env({})
    assert (world.rank, world.world_size, world.local_rank, world.is_main, world.distributed) == (0, 1, 0, True,
                                                                                                 False)
    assert world.agree((STOP_SIGNAL, 15), (1.5, 2.0)) == ([STOP_SIGNAL, 15], [1.5, 2.0])
    assert world.seed(7) == 7
    assert world.sum_counts(3, 4.0) == (3, 4.0) and world.rank0(1.5) == 1.5 and world.all_ok(False) is False
    world.barrier()
    assert tdist.init("cpu") == world  # no process group is made


def test_torchrun_variables_are_read_and_checked():
    world = tdist.world_from_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"})
    assert (world.rank, world.world_size, world.local_rank, world.is_main) == (9, 16, 1, False)
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        tdist.world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not integers"):
        tdist.world_from_env({"RANK": "a", "WORLD_SIZE": "2"})


def _worker(rank: int, port: int, out: str) -> None:
    import os

    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    world = tdist.init("cpu", timeout_s=60)
    try:
        result = {
            # a signal on rank 1 only; rank 0's clock and step count win
            "agreed": world.agree((STOP_SIGNAL if rank == 1 else STOP_BUDGET, 15 * rank),
                                  (100.0 + rank, 7 - rank)),
            "seed": world.seed(3),
            "counts": world.sum_counts(rank + 1, 10 * (rank + 1)),  # e.g. correct, images of each rank's shard
            "clock": world.rank0(100.0 + rank),
            "all_ok": [world.all_ok(True), world.all_ok(rank == 0)],  # a check failed on rank 1 only
            "is_main": world.is_main,
        }
    finally:
        tdist.shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_gloo_processes_agree_on_the_stop_flag_the_counts_and_rank_0s_clock(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)  # a hang fails the test instead of blocking CI
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.terminate()
    assert not alive and all(p.exitcode == 0 for p in ctx.processes)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["agreed"] == [[STOP_SIGNAL, 15], [100.0, 7.0]] and r["counts"] == [3.0, 30.0]
        assert r["clock"] == 100.0 and r["all_ok"] == [True, False]
    assert [r["is_main"] for r in results] == [True, False]
    assert results[0]["seed"] == 3 != results[1]["seed"]  # rank 0 draws as one process would; rank 1 its own


class _OtherRank:
    """A world of two whose other rank's counts are known: sum_counts adds them, as the all-reduce would."""

    def __init__(self, counts: tuple[float, ...]) -> None:
        self.counts = counts

    def sum_counts(self, *counts: float) -> tuple[float, ...]:
        return tuple(a + b for a, b in zip(counts, self.counts, strict=True))


def test_a_sharded_evaluation_counts_every_val_image_once(colour_dataset):
    import torch

    from model import build_model
    from pipelines import StageLoader, StageSpec, index_dataset
    from trainer.evaluate import evaluate

    torch.manual_seed(0)
    net = build_model("vit_local_test_patch16", num_classes=3, image_size=32)
    _, val = index_dataset(colour_dataset)  # 12 images: shards of 6, batches of 5 (a partial one on each rank)

    def loader(shard: int, shards: int):
        spec = StageSpec(image_size=32, batch_size=5, num_threads=1, shard_id=shard, num_shards=shards)
        return StageLoader(val, spec, train=False, device=torch.device("cpu"))

    whole = evaluate(net, loader(0, 1), None)
    rank1 = evaluate(net, loader(1, 2), None)
    counts1 = (rank1["top1"] * rank1["images"], rank1["top5"] * rank1["images"], rank1["images"])
    both = evaluate(net, loader(0, 2), None, world=_OtherRank(counts1))
    assert both["images"] == whole["images"] == len(val) == 12
    assert both["top1"] == pytest.approx(whole["top1"]) and both["top5"] == pytest.approx(whole["top5"])
