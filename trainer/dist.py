"""Data-parallel set-up for `torchrun`: who this process is, and the few collectives the trainer needs.

One process without `torchrun` (no RANK/WORLD_SIZE in the environment) gets a `World` of size 1 whose collectives
return their input: the single-GPU path does not change. Under `torchrun` each process joins the default process
group (NCCL on CUDA, gloo on the CPU) and the trainer asks only this module who it is and what every rank agreed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, metrics, readout and checkpoints; the others only compute."""
        return self.rank == 0

    def agree(self, flags: Sequence[int] = (), values: Sequence[float] = ()) -> tuple[list[int], list[float]]:
        """One collective for the decisions every rank must share: the largest of each of ``flags`` over the ranks
        (a stop flag, a signal number: what happens on any rank stops them all) and rank 0's ``values`` (its clock,
        its gate's verdicts). A world of one returns its input."""
        if not self.distributed:
            return list(flags), list(values)
        mine = values if self.is_main else (-math.inf,) * len(values)
        t = torch.tensor([*flags, *mine], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = t.tolist()
        return [int(f) for f in out[:len(flags)]], out[len(flags):]

    def rank0(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        return self.agree(values=(value,))[1][0]

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` held on every rank: a check failed on one rank (and said why there)
        stops them all, instead of leaving the others waiting in the next collective."""
        return self.agree((0 if ok else 1,))[0][0] == 0

    def seed(self, base: int) -> int:
        """This rank's seed for its random draws (augmentation, drop-path): ``base`` on rank 0, as in a single
        process; an independent stream per rank elsewhere."""
        if self.rank == 0:
            return base
        return int(np.random.SeedSequence([base, self.rank]).generate_state(1)[0])

    def sum_counts(self, *counts: float) -> tuple[float, ...]:
        """Element-wise sums over ranks, e.g. (correct top-1, correct top-5, images) of a sharded evaluation."""
        if not self.distributed:
            return tuple(counts)
        t = torch.tensor(counts, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tuple(t.tolist())

    def barrier(self) -> None:
        """Every rank waits for the others (rank 0 finishing its files before the others exit)."""
        if self.distributed:
            dist.barrier()


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The process's place, from the variables `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK); size 1 without."""
    env = os.environ if env is None else env
    if not launched(env):
        return World()
    try:
        world = World(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                      local_rank=int(env.get("LOCAL_RANK", env["RANK"])))
    except ValueError:
        raise ValueError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r}: not integers") from None
    if not 0 <= world.rank < world.world_size:
        raise ValueError(f"RANK={world.rank} is outside WORLD_SIZE={world.world_size}")
    return world


def launched(env: dict[str, str] | None = None) -> bool:
    """Started by `torchrun` (or anything that sets its variables)?"""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def init(device: str, timeout_s: float = 600.0) -> World:
    """Join the default process group when launched by `torchrun`, even as its only process (so that
    `torchrun --nproc-per-node 1` runs the data-parallel path, DDP included: a check of it on one GPU, and its
    overhead measured); a no-op without `torchrun`. ``device``: the resolved training device, "cuda" (NCCL, one
    GPU per local rank) or "cpu" (gloo)."""
    world = world_from_env()
    if not launched() or dist.is_initialized():
        return world
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
