"""Top-1 and top-5 accuracy of a model over a whole split."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.dist import World


@torch.inference_mode()
def evaluate(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             amp_dtype: torch.dtype | None, world: World | None = None) -> dict[str, float]:
    """Counts stay on the device until the end: one host sync per evaluation, not per batch. With ``world`` (data
    parallel, each rank evaluating its own shard of the split) the counts ``[correct, count]`` are summed over the
    ranks before dividing, so every image counts once, whatever each shard's size."""
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
    counts = (correct1.item(), correct5.item(), seen) if seen else (0, 0, 0)
    if world is not None:
        counts = world.sum_counts(*counts)
    c1, c5, seen = counts
    if not seen:
        raise ValueError("evaluation split yielded no images")
    return {"top1": c1 / seen, "top5": c5 / seen, "images": int(seen)}
