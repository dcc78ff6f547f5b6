"""What a stage reads: its pipeline's spec and its batch, from the config (shared by the loop, the printed plan, the
evaluation commands, the profiler and the benchmarks, none of which needs the loop for it)."""

from __future__ import annotations

import torch

from pipelines import StageSpec
from trainer.config import TrainConfig
from trainer.curriculum import stage_batch_size
from trainer.dist import World

EVAL_BATCH = 128


def stage_spec(cfg: TrainConfig, device: torch.device, image_size: int, batch_size: int,
               seed: int | None = None, train: bool = True, world: World | None = None) -> StageSpec:
    """The pipeline for a stage. Data-parallel (``world``): this rank's shard of the split (by global rank, so
    every node reads its own), its own augmentation seed, and the shuffle seed every rank shares."""
    world = world or World()
    seed = cfg.seed if seed is None else seed
    return StageSpec.on(device, decoder=cfg.decoder, image_size=image_size, batch_size=batch_size,
                        num_threads=cfg.workers, seed=world.seed(seed), shuffle_seed=seed, shard_id=world.rank,
                        num_shards=world.world_size, interp="cubic" if cfg.interp == "bicubic" else "linear",
                        rand_augment=randaug_bins(cfg) if train else None, min_area=cfg.min_area,
                        source_ratio=cfg.source_ratio, handoff=cfg.data_handoff)


def randaug_bins(cfg: TrainConfig) -> tuple[int, int] | None:
    """timm's magnitude (0..10) on DALI's 31 bins (0..30): m9 -> 27."""
    return (cfg.randaug_n, round(cfg.randaug * 3)) if cfg.randaug else None


def stage_batch(cfg: TrainConfig, image_size: int, train_images: int) -> int:
    """The per-process batch at a stage: --stage-batch's rule, capped by --max-batch and by this process's shard
    of the training images (``cfg.world_size`` processes each read 1/world_size of them). The printed plan and the
    run both ask here, so the plan shows the batch that runs."""
    shard = train_images // max(1, cfg.world_size)
    return stage_batch_size(cfg.batch_size, image_size, cfg.plan().final, cfg.stage_batch,
                            min(cfg.max_batch, shard))
