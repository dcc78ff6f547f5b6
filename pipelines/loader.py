"""StageLoader: owns one DALI pipeline and its PyTorch iterator, yields batches on the training device."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from nvidia.dali import backend as dali_backend
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.dali import StageSpec, build_train_pipeline, build_val_pipeline
from pipelines.folder import Split
from pipelines.integrity import find_broken_image

PREPARE_HINT = "check or repair the dataset with tools/prepare_imagenet.py"


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


_malloc_trim = _load_malloc_trim()  # glibc only; elsewhere None


class ImageDecodeError(RuntimeError):
    """A file in the split cannot be read or decoded; DALI's pipeline is dead after this."""

    def __init__(self, path: str | None, reason: str, dali_message: str) -> None:
        self.path, self.reason, self.dali_message = path, reason, dali_message
        where = f"{path}: {reason}" if path else f"an image in the dataset could not be decoded ({reason})"
        super().__init__(f"{where}; {PREPARE_HINT}")


def _dali_reason(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1:]
        if after:
            return after[0]
    return lines[-1] if lines else "unknown error"


def _hand_outputs_to_torch_stream(pipe, device: torch.device) -> None:
    """Make the pipeline's outputs wait for their GPU work on PyTorch's current stream, not on the host.

    DALI's iterator calls ``share_outputs()`` with no stream, which blocks the host until the batch's GPU work is
    done (an event synchronize); on a GPU busy with training kernels the host then stalls instead of queueing the
    next step. ``share_outputs(cuda_stream=...)`` (exec_dynamic, DALI's default executor) orders the outputs on the
    given stream instead; the host still waits for the batch's CPU-side work, which is real data starvation.
    """
    share = pipe.share_outputs
    pipe.share_outputs = lambda cuda_stream=None: share(cuda_stream=torch.cuda.current_stream(device))


class StageLoader:
    """Iterate one split at one stage. ``set_stage`` swaps in a new pipeline and frees the old one.

    Training iterates full batches only (the last partial batch is dropped, a fresh shuffle each epoch);
    evaluation iterates every sample exactly once.
    """

    def __init__(self, split: Split, spec: StageSpec, *, train: bool, device: torch.device) -> None:
        self.split, self.train, self.device = split, train, device
        self.spec = spec
        self.source = split  # what the current pipeline reads: the split, or its pre-resized copy for this stage
        self._iterator: DALIGenericIterator | None = None

    def set_stage(self, spec: StageSpec) -> None:
        """Switch to ``spec`` now: the old pipeline is freed and the new one built and prefetching on return."""
        if spec != self.spec or self._iterator is None:
            self.close()
            self.spec = spec
            self._start()

    @property
    def source_px(self) -> int | None:
        """The shorter-side size of the pre-resized copy being read, or None when reading the split itself."""
        return next((px for px, folder in self.split.copies if folder == self.source.root), None)

    def __len__(self) -> int:
        per_shard = -(-len(self.split) // self.spec.num_shards)
        if self.train:
            return per_shard // self.spec.batch_size
        return -(-per_shard // self.spec.batch_size)

    def _build(self) -> DALIGenericIterator:
        builder = build_train_pipeline if self.train else build_val_pipeline
        self.source = self.split.for_stage(self.spec.image_size, self.spec.source_ratio)
        pipe = builder(self.source, self.spec)
        if self.spec.device == "gpu" and self.spec.handoff == "stream":
            _hand_outputs_to_torch_stream(pipe, self.device)
        if not self.train:
            policy = LastBatchPolicy.PARTIAL
        elif self.spec.num_shards > 1:
            # Shards differ in size by one file, and under DROP DALI sizes each one unpadded, so ranks would take
            # different numbers of steps. Padded shards, full batches (FILL), and __iter__ stops every rank at
            # len(self) steps and drains the rest of the epoch.
            policy = LastBatchPolicy.FILL
        else:
            policy = LastBatchPolicy.DROP
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader", auto_reset=True,
                                   last_batch_policy=policy)

    def _start(self) -> None:
        with self._decode_errors():
            self._iterator = self._build()  # builds and prefetches: decode errors can surface here

    @contextmanager
    def _decode_errors(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:
            if "Critical error in pipeline" not in str(e):
                raise
            self._iterator = None  # DALI says the pipeline object is no longer valid
            raise self._explain(str(e)) from None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None:
            self._start()
        steps = len(self) if self.train and self.spec.num_shards > 1 else None
        with self._decode_errors():
            for i, batch in enumerate(self._iterator):
                if steps is not None and i >= steps:
                    continue  # drain the epoch's remainder, so the iterator resets at its end
                out = batch[0]
                # NHWC -> NCHW view: channels-last in memory, no copy.
                images = out["images"].permute(0, 3, 1, 2)
                labels = out["labels"].squeeze(-1).long()
                if images.device != self.device:
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                yield images, labels

    def _explain(self, message: str) -> ImageDecodeError:
        if self.source.shards:  # members of tar shards: DALI's message is all there is
            return ImageDecodeError(None, _dali_reason(message), message)
        for path in self.source.files:  # some DALI errors (e.g. file mapping) name the file
            if path in message:
                return ImageDecodeError(path, _dali_reason(message), message)
        found = find_broken_image(self.source.files)
        if found:
            return ImageDecodeError(found[0], found[1], message)
        return ImageDecodeError(None, _dali_reason(message), message)

    def close(self) -> None:
        """Drop the iterator and pipeline and hand DALI's pooled memory back (pools outlive pipelines).

        Then return freed heap pages to the OS: without ``malloc_trim``, glibc keeps the old pipeline's
        per-thread arenas and host RSS grows by ~10-20 MB per rebuild although nothing leaks.
        """
        if self._iterator is not None:
            self._iterator = None
            gc.collect()
            dali_backend.ReleaseUnusedMemory()
            if _malloc_trim is not None:
                _malloc_trim(0)
