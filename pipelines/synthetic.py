"""A synthetic, on-device stand-in for StageLoader: the model and the loop measured without any decoding."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines.dali import StageSpec


class SyntheticLoader:
    """Yields one fixed random batch, already on the device in the pipeline's layout (NHWC memory, NCHW view)."""

    def __init__(self, num_classes: int, spec: StageSpec, *, steps_per_epoch: int, device: torch.device,
                 on_fallback: object = None) -> None:  # nothing is decoded: nothing falls back
        self.num_classes, self.steps, self.device = num_classes, steps_per_epoch, device
        self.spec = spec
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_stage(self, spec: StageSpec) -> None:
        self.spec, self._batch = spec, None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._batch is None:
            s = self.spec
            dtype = torch.float16 if s.half else torch.float32
            images = torch.randn(s.batch_size, s.image_size, s.image_size, 3, device=self.device, dtype=dtype)
            labels = torch.randint(0, self.num_classes, (s.batch_size,), device=self.device)
            self._batch = (images.permute(0, 3, 1, 2), labels)
        for _ in range(self.steps):
            images, labels = self._batch
            yield images.clone(), labels  # the loop's augmentations work in place, as on a fresh batch

    def close(self) -> None:
        self._batch = None
