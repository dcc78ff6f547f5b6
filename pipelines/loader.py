"""StageLoader: owns one DALI pipeline and its PyTorch iterator, yields batches on the training device."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from nvidia.dali import backend as dali_backend
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.dali import StageSpec, build_train_pipeline, build_val_pipeline
from pipelines.folder import Split
from pipelines.integrity import find_broken_image

PREPARE_HINT = "check or repair the dataset with vit-prepare"


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

    def __init__(self, split: Split, spec: StageSpec, *, train: bool, device: torch.device,
                 on_fallback: Callable[[str, str, BaseException], None] | None = None) -> None:
        self.split, self.train, self.device = split, train, device
        self.spec = spec
        self.source = split  # what the current pipeline reads: the split, or its pre-resized copy for this stage
        # A GPU spec whose pipeline fails to build or to make its first batch (nvJPEG, an allocation): with
        # ``on_fallback`` (called with "mixed", "cpu" and the error; it may raise to forbid it) the stage decodes
        # on the CPU instead, its batches copied to ``device``; without it the error propagates.
        self.on_fallback = on_fallback
        self._cpu_for: StageSpec | None = None  # the GPU spec that fell back: its rebuilds go to the CPU at once
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

    @property
    def decoder(self) -> str:
        """What decodes this stage's images: "mixed" (DALI's GPU decoder) or "cpu"."""
        return "mixed" if self.spec.device == "gpu" and self._cpu_for != self.spec else "cpu"

    def __len__(self) -> int:
        per_shard = -(-len(self.split) // self.spec.num_shards)
        if self.train:
            return per_shard // self.spec.batch_size
        return -(-per_shard // self.spec.batch_size)

    def _build(self, spec: StageSpec) -> DALIGenericIterator:
        builder = build_train_pipeline if self.train else build_val_pipeline
        self.source = self.split.for_stage(spec.image_size, spec.source_ratio)
        pipe = builder(self.source, spec)
        if spec.device == "gpu" and spec.handoff == "stream":
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
        """Build the pipeline and its iterator, which prefetches: errors of the build and of the first batches
        surface here. A GPU spec that fails here falls back to the CPU decoder for the stage (see ``on_fallback``),
        unless the failure is a file that no decoder reads (then the CPU would fail on it too)."""
        if self.spec.device == "gpu" and self._cpu_for != self.spec:
            try:
                with self._decode_errors():
                    self._iterator = self._build(self.spec)
                return
            except Exception as error:  # noqa: BLE001 - what the GPU decoder raised is reported, then passed by
                if self.on_fallback is None or (isinstance(error, ImageDecodeError) and error.path):
                    raise
                self._iterator = None
                self.close(force=True)  # whatever the failed build holds, freed before the CPU pipeline is built
                self.on_fallback("mixed", "cpu", error)
                self._cpu_for = self.spec
        spec = self.spec if self.spec.device == "cpu" else replace(self.spec, device="cpu", device_id=None)
        with self._decode_errors():
            self._iterator = self._build(spec)

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

    def close(self, force: bool = False) -> None:
        """Drop the iterator and pipeline and hand DALI's pooled memory back (pools outlive pipelines).

        Then return freed heap pages to the OS: without ``malloc_trim``, glibc keeps the old pipeline's
        per-thread arenas and host RSS grows by ~10-20 MB per rebuild although nothing leaks.
        """
        if self._iterator is not None or force:
            self._iterator = None
            gc.collect()
            dali_backend.ReleaseUnusedMemory()
            if _malloc_trim is not None:
                _malloc_trim(0)
