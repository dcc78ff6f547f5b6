"""Top-1 and top-5 accuracy of a model over a whole split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.dist import World


@torch.inference_mode()
def evaluate(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             amp_dtype: torch.dtype | None, world: World | None = None,
             num_classes: int | None = None) -> dict[str, Any]:
    """Counts stay on the device until the end: one host sync per evaluation, not per batch. With ``world`` (data
    parallel, each rank evaluating its own shard of the split) the counts ``[correct, count]`` are summed over the
    ranks before dividing, so every image counts once, whatever each shard's size. With ``num_classes``, also the
    confusion matrix (rows: true class, columns: predicted), summed over the ranks the same way."""
    was_training = net.training
    net.eval()
    correct1 = correct5 = seen = confusion = None
    for images, labels in batches:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        c1, c5 = hits[:, 0].sum(), hits.any(dim=1).sum()
        if num_classes is not None:
            pairs = torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes * num_classes)
            confusion = pairs if confusion is None else confusion + pairs
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
    result: dict[str, Any] = {"top1": c1 / seen, "top5": c5 / seen, "images": int(seen)}
    if num_classes is not None:
        if confusion is None:  # this rank's shard was empty
            confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
        result["confusion"] = _summed(confusion, world).view(num_classes, num_classes).cpu()
    return result


def _summed(counts: torch.Tensor, world: World | None) -> torch.Tensor:
    if world is not None and world.distributed:
        import torch.distributed as dist

        from trainer.dist import _collective_device

        counts = counts.to(_collective_device())
        dist.all_reduce(counts)
    return counts
