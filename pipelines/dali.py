"""DALI pipelines for one curriculum stage: pure builders from a StageSpec and a Split."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import rand_augment
from nvidia.dali.pipeline import Pipeline

from pipelines.folder import Split

# _quiet_dali_deprecations: DALI 2.4's own auto_aug calls its deprecated fn.experimental aliases and warns under a
# forced "default" filter, so no filter hides it; recording the warnings of that one call (and dropping them) does.
# The warning is for DALI, not for our users.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then centre-crop size (DeiT's eval)


@dataclass(frozen=True)
class StageSpec:
    """Everything a pipeline depends on: change any field and the pipeline is rebuilt."""

    image_size: int
    batch_size: int
    device: Literal["cpu", "gpu"] = "cpu"
    device_id: int | None = None
    num_threads: int = 0  # 0: one per CPU core
    seed: int = 0  # the pipeline's random operators (crops, flips, RandAugment): differs per rank
    # the epoch's shuffled order (None: ``seed``): the same on every rank, so the shards partition one order
    shuffle_seed: int | None = None
    shard_id: int = 0
    num_shards: int = 1
    half: bool = False  # emit float16 (the GPU path; no faster on the CPU)
    interp: Literal["linear", "cubic"] = "linear"
    rand_augment: tuple[int, int] | None = None  # (ops per image, magnitude on DALI's 0..30 scale)
    min_area: float = 0.08  # random-resized-crop area range [min_area, 1]
    source_ratio: float = 2.0  # prepared copies: read the smallest whose shorter side >= source_ratio x image_size
    # GPU batches: "host" waits on the host until the batch is decoded (DALI's iterator default); "stream" makes
    # PyTorch's current stream wait for it on the device instead, so the host never blocks on GPU work
    handoff: Literal["host", "stream"] = "host"

    def __post_init__(self) -> None:
        if self.device == "gpu" and self.device_id is None:
            raise ValueError("a gpu StageSpec needs a device_id")
        if self.device == "cpu" and self.device_id is not None:
            raise ValueError("a cpu StageSpec takes device_id=None (DALI then needs no CUDA)")
        if self.handoff not in ("host", "stream"):
            raise ValueError(f"handoff must be 'host' or 'stream', not {self.handoff!r}")

    @classmethod
    def on(cls, device, decoder: str = "auto", **fields) -> StageSpec:
        """A spec for a ``torch.device``: on CUDA, GPU decode ("mixed") on that card with float16 output, unless
        ``decoder`` is "cpu" (the CPU decodes, float16 batches are copied to the card); else CPU."""
        cuda = device.type == "cuda"
        gpu = cuda and decoder != "cpu"
        return cls(device="gpu" if gpu else "cpu", device_id=(device.index or 0) if gpu else None, half=cuda,
                   **fields)

    @property
    def threads(self) -> int:
        return self.num_threads or os.cpu_count() or 1


def _pipeline_kwargs(spec: StageSpec) -> dict:
    return dict(batch_size=spec.batch_size, num_threads=spec.threads, device_id=spec.device_id,
                seed=spec.seed, prefetch_queue_depth=2)


def _normalize(images, spec: StageSpec, **crop_args):
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if spec.half else types.FLOAT,
        output_layout="HWC",  # NHWC batches: a channels-last NCHW view in PyTorch, no copy
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[s * 255 for s in IMAGENET_STD],
        **crop_args,
    )


_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}


def _read_shards(split: Split, spec: StageSpec, shuffle: bool):
    """WebDataset shards in place (pipelines/wds.py): the image member, and the .cls member's ASCII digits parsed
    into an int32 label inside the pipeline. Training mixes samples in a shuffle buffer (the shards' own order
    otherwise), not a full reshuffle of the split as the file reader does."""
    from pipelines.wds import IMAGE_EXT, LABEL_EXT

    images, cls = fn.readers.webdataset(
        paths=[tar for tar, _ in split.shards], index_paths=[idx for _, idx in split.shards],
        ext=[IMAGE_EXT, LABEL_EXT], missing_component_behavior="error", random_shuffle=shuffle,
        initial_fill=4096, shard_id=spec.shard_id, num_shards=spec.num_shards,
        pad_last_batch=spec.num_shards > 1 or not shuffle, name="Reader",
    )
    return images, fn.reshape(_ascii_int(cls), shape=[1])


def _ascii_int(text, width: int = 8):
    """A class index written as ASCII digits, then optional whitespace, as int32, in a few vector operations (one
    scalar operation per character cost 40% of the 32-px pipeline's rate): sum of digit_i * 10^(n - 1 - i) over
    the n leading digits."""
    chars = fn.cast(fn.pad(text, fill_value=ord(" "), shape=[width]), dtype=types.INT32)
    digit = fn.cast((chars >= ord("0")) & (chars <= ord("9")), dtype=types.INT32)
    position = types.Constant(np.arange(width, dtype=np.int32))
    weight = fn.cast(dmath.pow(10.0, fn.cast(fn.reductions.sum(digit) - 1 - position, dtype=types.FLOAT)),
                     dtype=types.INT32)
    return fn.reductions.sum((chars - ord("0")) * digit * weight)


def _read(split: Split, spec: StageSpec, train: bool):
    """This rank's shard of the encoded images and their labels: WebDataset shards, or files — for training
    reshuffled each epoch (padded only when sharded: see StageLoader), for evaluation in order and padded, so
    every sample is read once."""
    if split.shards:
        return _read_shards(split, spec, shuffle=train)
    if train:  # a full reshuffle each epoch; random_shuffle only mixes a 1k-sample window
        order = dict(shuffle_after_epoch=True, pad_last_batch=spec.num_shards > 1,
                     shuffle_after_epoch_seed=spec.seed if spec.shuffle_seed is None else spec.shuffle_seed)
    else:
        order = dict(random_shuffle=False, pad_last_batch=True)
    return fn.readers.file(files=list(split.files), labels=list(split.labels), shard_id=spec.shard_id,
                           num_shards=spec.num_shards, name="Reader", **order)


@pipeline_def(enable_conditionals=True)  # DALI's auto_aug chooses operations with conditionals
def _train_graph(split: Split, spec: StageSpec):
    jpegs, labels = _read(split, spec, train=True)
    gpu = spec.device == "gpu"
    images = fn.decoders.image_random_crop(
        jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,  # RGB: grayscale/CMYK arrive as RGB
        random_area=[spec.min_area, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
    )
    images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size, interp_type=_INTERP[spec.interp],
                       antialias=True)
    if spec.rand_augment:
        n, m = spec.rand_augment
        with warnings.catch_warnings(record=True):  # see _quiet_dali_deprecations
            images = rand_augment.rand_augment(images, n=n, m=m, shape=(spec.image_size, spec.image_size),
                                               monotonic_mag=True)  # increasing severity, as timm's "inc1"
    images = _normalize(images, spec, mirror=fn.random.coin_flip(probability=0.5))
    if gpu:
        labels = labels.gpu()
    return images, labels


@pipeline_def
def _val_graph(split: Split, spec: StageSpec):
    jpegs, labels = _read(split, spec, train=False)
    gpu = spec.device == "gpu"
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(spec.image_size / EVAL_CROP_FRACTION),
                       interp_type=_INTERP[spec.interp], antialias=True)
    images = _normalize(images, spec, crop=(spec.image_size, spec.image_size))
    if gpu:
        labels = labels.gpu()
    return images, labels


def build_train_pipeline(split: Split, spec: StageSpec) -> Pipeline:
    """Read (reshuffled each epoch) -> decode with random-resized-crop -> resize -> [RandAugment] -> flip ->
    normalize -> NHWC."""
    return _train_graph(split, spec, **_pipeline_kwargs(spec))


def build_val_pipeline(split: Split, spec: StageSpec) -> Pipeline:
    """Read in order -> decode -> resize shorter side to size/0.875 -> centre crop -> normalize -> NHWC."""
    return _val_graph(split, spec, **_pipeline_kwargs(spec))
