"""Top-1 and top-5 accuracy of a model over a whole split."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import replace
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


def _resize(batches: Any, size: int) -> None:
    """The loader ``batches`` at another image size (its pipeline rebuilt)."""
    batches.set_stage(replace(batches.spec, image_size=size))


PROBE_BATCHES = 3  # val batches timed at the start, to reserve the final evaluation before any was measured


class Evaluator:
    """The run's evaluations of ``net`` (the EMA copy with --ema) over the val loader: timed, charged (or not) to
    the budget, their cost recorded in the stop gate, each an ``eval`` event; and before any, a probe that reserves
    the final one. ``evaluate_model`` is what measures (tests swap in one that ticks a fake clock)."""

    def __init__(self, net: nn.Module, batches: Any, amp: torch.dtype | None, budget: Any, gate: Any, cfg: Any,
                 run_dir: Any, readout: Any, world: World, last_s: float | None = None) -> None:
        self.net, self.batches, self.amp, self.budget, self.gate = net, batches, amp, budget, gate
        self.cfg, self.run_dir, self.readout = cfg, run_dir, readout
        self.evaluate_model = functools.partial(evaluate, world=world)
        self.last: dict[str, float] | None = None  # this epoch's evaluation (None: not current)
        self.last_s = last_s  # the last evaluation's seconds (kept across a resume)
        self.size = cfg.final_eval_size  # the val loader's image size
        if last_s is not None:
            gate.record_eval(last_s)

    def probe(self) -> None:
        """Before any evaluation is measured, the end must still be reserved: time the val pipeline's build and
        its first batches (decode, the model at the eval size, autotuning), extrapolate to the whole split, and
        start the real evaluations from a fresh pipeline. Skipped when evaluations are not charged."""
        if not self.gate.charge_eval or self.gate.eval_s is not None:
            return
        clock, batches = self.budget.clock, len(self.batches)
        val = iter(self.batches)  # one pass, read in two parts: the first batch, then the next ones
        start = clock()
        first = self.evaluate_model(self.net, itertools.islice(val, 1), self.amp)
        first_s = clock() - start
        rest_s, rest = 0.0, min(PROBE_BATCHES - 1, batches - 1)
        if rest > 0:
            t = clock()
            self.evaluate_model(self.net, itertools.islice(val, rest), self.amp)
            rest_s = clock() - t
        del val
        self.batches.close()  # a partial epoch: the first real evaluation starts a new one
        per_batch = rest_s / rest if rest > 0 else first_s
        # the build and first batch once more: the real first evaluation rebuilds, and a partial last batch is a
        # new shape to autotune
        estimate = 2 * first_s + max(0, batches - 1) * per_batch
        self.gate.estimate_eval(estimate)
        self.run_dir.log("eval_probe", batches=1 + rest, first_batch_s=round(first_s, 4),
                         per_batch_s=round(per_batch, 4), estimate_s=round(estimate, 3), images=first["images"],
                         elapsed_s=round(self.budget.elapsed, 3))

    def __call__(self, state: Any) -> dict[str, float]:
        """Evaluate now (charged to the budget unless --budget-counts train), as an ``eval`` event."""
        s, clock = state, self.budget.clock
        start = clock()
        with self.budget.uncharged(self.cfg.budget_counts == "train"):
            result = self.evaluate_model(self.net, self.batches, self.amp)
        eval_s = clock() - start
        self.last, self.last_s = result, eval_s
        if self.gate.charge_eval:
            self.gate.record_eval(eval_s)
        fields = dict(step=s.step, epoch=round(s.epoch + s.epoch_progress, 4), stage=s.stage,
                      image_size=self.size, images=result.get("images"), top1=round(result["top1"], 5),
                      top5=round(result["top5"], 5), eval_s=round(eval_s, 3), elapsed_s=round(self.budget.elapsed, 3))
        self.run_dir.log("eval", **fields)
        self.readout.update(**{k: v for k, v in fields.items() if k not in ("image_size", "images")})
        if self.readout.live:  # plain mode already printed the line
            self.readout.message(f"epoch {fields['epoch']}: val top1 {100 * result['top1']:.2f}%  "
                                 f"top5 {100 * result['top5']:.2f}%")
        return result

    def final(self, state: Any, size: int) -> dict[str, float]:
        """The run's last evaluation, at ``size``: this epoch's when it is current and was made at that size."""
        if self.last is not None and not state.epoch_progress > 0 and size == self.size:
            return self.last
        if size != self.size:
            _resize(self.batches, size)
            self.size = size
        return self(state)

    def measure_on(self, batches: Any) -> Callable[[int], dict[str, Any]]:
        """``measure(size)``: the model's accuracy over ``batches`` (a loader of another split: the held-out
        slice) at ``size``, charged like an evaluation; no event (the caller records what it decided)."""
        def measure(size: int) -> dict[str, Any]:
            _resize(batches, size)
            with self.budget.uncharged(self.cfg.budget_counts == "train"):
                return self.evaluate_model(self.net, batches, self.amp)
        return measure
