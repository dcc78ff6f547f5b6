"""Batch-level augmentation on the training device: random erasing, then mixup/cutmix with label smoothing."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from trainer.config import TrainConfig


class BatchAugment:
    """What DeiT does per sample after the pipeline (erasing) and per batch (mixup/cutmix), with timm's own code,
    on the device. With mixing off, the targets stay class indices and the loss is cross-entropy with label
    smoothing; with mixing on, targets are soft (label smoothing folded in) and the loss is soft-target CE."""

    def __init__(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> None:
        self.erase = (RandomErasing(probability=cfg.reprob, mode="pixel", max_count=1, device=str(device))
                      if cfg.reprob > 0 else None)
        self.mix = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mix_switch_prob,
                          mode="batch", label_smoothing=cfg.label_smoothing, num_classes=num_classes)
                    if cfg.mixup > 0 or cfg.cutmix > 0 else None)
        self.criterion: nn.Module = (SoftTargetCrossEntropy() if self.mix
                                     else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            self.erase(images)  # in place, per image
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        return images, labels
