"""Top-1 and top-5 accuracy of a model over a whole split."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.inference_mode()
def evaluate(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Counts stay on the device until the end: one host sync per evaluation, not per batch."""
    was_training = net.training
    net.eval()
    correct1 = correct5 = seen = None
    for images, labels in batches:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(images)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        c1, c5 = hits[:, 0].sum(), hits.any(dim=1).sum()
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        seen = labels.numel() if seen is None else seen + labels.numel()
    net.train(was_training)
    if not seen:
        raise ValueError("evaluation split yielded no images")
    return {"top1": correct1.item() / seen, "top5": correct5.item() / seen, "images": seen}
