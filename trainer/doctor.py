"""`vit-train --check-gpu`: which fast paths this machine runs, and what each costs next to its fallback.

Before a long run, a user learns in about a minute what their card will run: at each stage size of the plan, the
captured step against the eager one, the fused FFN (checked against PyTorch's ops, then timed against them) and
DALI's GPU decoder against its CPU decoder. Each fast path is built as the trainer builds it, but nothing falls
back here: a failure is the row's result (with what a run would run instead). Nothing is written.
``tools/gpu_check.py`` stays the benchmark; this is the check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from pipelines import Split, StageLoader
from trainer.config import TrainConfig
from trainer.curriculum import stage_batch_size
from trainer.data import stage_spec
from trainer.fastpath import one_line
from trainer.step import TrainStep, fallback_mode, resolve_amp, resolve_device, resolve_step_mode

NOT_ON_CPU = "not available on CPU"


@dataclass
class Row:
    size: int
    path: str  # step, fused FFN, decoder
    runs: str  # what was run: graph, eager, fused, PyTorch ops, mixed, cpu
    result: str  # works, fails: ..., not available ...
    ms: float | None = None  # per step, per FFN call (forward and backward) or per batch

    @property
    def ok(self) -> bool:
        return self.result.startswith("works")


class _Failed(Exception):  # noqa: N818 - the step's fallback, refused: the check reports instead of falling back
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(work: Callable[[], object], calls: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        work()
    _sync(device)
    return 1000 * (time.perf_counter() - start) / calls


def _step_ms(step: TrainStep, images: torch.Tensor, labels: torch.Tensor, calls: int) -> float:
    return _ms(lambda: step(images.clone(), labels), calls, step.device)  # augmentations work in place


def _batch_ms(batches: Iterator, calls: int, device: torch.device) -> float:
    next(batches)  # the build and the first batch
    return _ms(lambda: next(batches), calls, device)


def _refuse(failed: str, to: str, error: BaseException, why: str) -> None:
    raise _Failed(f"{one_line(error)}; a run falls back to {to}") from error


def check(cfg: TrainConfig, split: Split, steps: int = 3, say: Callable[..., None] = print) -> list[Row]:
    """The rows of the table, stage size by stage size (the plan's sizes, each at its stage's batch)."""
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    plan = cfg.plan()
    classes = len(split.classes)
    cuda = device.type == "cuda"
    graph_ok, graph_why = (resolve_step_mode("graph", device, amp)[0] == "graph", "")
    if not graph_ok:
        graph_why = NOT_ON_CPU if not cuda else "fp16's grad scaler cannot be captured (--amp bf16 can)"
    say(f"checking the fast paths on {torch.cuda.get_device_name(device) if cuda else 'the CPU'} "
        f"({cfg.model}, amp {str(amp).removeprefix('torch.') if amp else 'off'}, sizes "
        f"{', '.join(str(s.image_size) for s in plan.stages())}) ...")
    eager = TrainStep.for_config(cfg, classes, device, image_size=plan.start, mode="eager", fused_ffn=False)
    graph: TrainStep | None = None
    rows: list[Row] = []
    for stage in plan.stages():
        size, first = stage.image_size, len(rows)
        batch = stage_batch_size(cfg.batch_size, size, plan.final, cfg.stage_batch, min(cfg.max_batch, len(split)))
        images, labels = _batch(batch, size, classes, device)
        # the step: captured against eager
        if graph_ok:
            try:
                if graph is None:
                    graph = TrainStep.for_config(cfg, classes, device, image_size=size, mode="graph")
                    graph.on_fallback = _refuse
                graph.move_to(size)
                for _ in range(graph.settle_steps):
                    graph(images.clone(), labels)
                rows.append(Row(size, "step", "graph", "works", _step_ms(graph, images, labels, steps)))
            except Exception as e:  # noqa: BLE001 - the row says what failed
                why = str(e) if isinstance(e, _Failed) else f"{one_line(e)}; a run falls back to " \
                                                            f"{fallback_mode(device)[0]}"
                rows.append(Row(size, "step", "graph", f"fails: {why}"))
                graph = None  # the next size tries a fresh one
        else:
            rows.append(Row(size, "step", "graph", graph_why))
        eager.move_to(size)
        eager(images.clone(), labels)  # autotuning, allocations
        rows.append(Row(size, "step", "eager", "works", _step_ms(eager, images, labels, steps)))
        rows.extend(_ffn_rows(cfg, eager, size, batch, amp, device, steps))
        rows.extend(_decoder_rows(cfg, split, device, size, batch, steps))
        failed = [f"{r.path} {r.runs}" for r in rows[first:] if r.result.startswith("fails")]
        say(f"  {size:>4} px: checked" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return rows


def _batch(batch: int, size: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch as the pipeline hands it over: NHWC memory viewed as NCHW, fp16 on a GPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    images = torch.randn(batch, size, size, 3, device=device, dtype=dtype).permute(0, 3, 1, 2)
    return images, torch.randint(0, classes, (batch,), device=device)


def _ffn_rows(cfg: TrainConfig, step: TrainStep, size: int, batch: int, amp: torch.dtype | None,
              device: torch.device, calls: int) -> list[Row]:
    """The fused middle of the locality FFN checked against PyTorch's ops at this stage's shapes, then both timed
    (forward and backward of one FFN's middle)."""
    from model import LOCALITY_MODELS, fused_ffn
    from model.locality_vit import LocalityFeedForward

    if cfg.model not in LOCALITY_MODELS or cfg.act != "hswish":
        return [Row(size, "fused FFN", "fused", f"not used by {cfg.model} --act {cfg.act}")]
    ffn = next(m for m in step.net.modules() if isinstance(m, LocalityFeedForward))
    side = size // 16
    prefix = getattr(step.net, "num_prefix_tokens", 1)
    dtype = amp or torch.float32
    channels = ffn.dwconv.weight.shape[0]
    h = torch.randn(batch, prefix + side * side, channels, device=device, dtype=dtype, requires_grad=True)
    weight = ffn.dwconv.weight.detach().clone().requires_grad_(True)

    def unfused() -> None:
        fused_ffn.reference(h, weight, (side, side)).sum().backward()

    rows = []
    if device.type != "cuda":
        rows.append(Row(size, "fused FFN", "fused", NOT_ON_CPU))
    elif not fused_ffn.available():
        rows.append(Row(size, "fused FFN", "fused", "Triton is not installed; a run uses PyTorch's ops"))
    else:
        try:
            error, problem = fused_ffn.disagreement(ffn.dwconv.weight, batch, (side, side), prefix, dtype)
            if problem is not None:
                raise RuntimeError(problem)

            def fused() -> None:
                fused_ffn.locality_dwconv(h, weight, side, side).sum().backward()

            rows.append(Row(size, "fused FFN", "fused", f"works (relative error {error:.1e})",
                            _ms(fused, calls, device)))
        except Exception as e:  # noqa: BLE001 - the row says what failed
            rows.append(Row(size, "fused FFN", "fused", f"fails: {one_line(e)}; a run uses PyTorch's ops"))
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        unfused()
        rows.append(Row(size, "fused FFN", "PyTorch ops", "works", _ms(unfused, calls, device)))
    return rows


def _decoder_rows(cfg: TrainConfig, split: Split, device: torch.device, size: int, batch: int,
                  batches: int) -> list[Row]:
    """DALI's mixed decoder (on a GPU) and its CPU decoder: each stage's train pipeline built, its first batch
    made, then ``batches`` more timed."""
    rows = []
    decoders = ("mixed", "cpu") if device.type == "cuda" else ("cpu",)
    if device.type != "cuda":
        rows.append(Row(size, "decoder", "mixed", NOT_ON_CPU))
    for decoder in decoders:
        spec = stage_spec(cfg, device, size, batch)
        if decoder == "cpu":  # what the loader's fallback builds
            spec = replace(spec, device="cpu", device_id=None)
        loader = StageLoader(split, spec, train=True, device=device)  # no on_fallback: a failure is the result
        try:
            batches_ms = _batch_ms(_forever(loader), batches, device)
            rows.append(Row(size, "decoder", decoder, "works", batches_ms))
        except Exception as e:  # noqa: BLE001 - the row says what failed
            then = "; a run decodes this stage on the CPU" if decoder == "mixed" else ""
            rows.append(Row(size, "decoder", decoder, f"fails: {one_line(e)}{then}"))
        finally:
            loader.close()
    return rows


def _forever(loader: StageLoader) -> Iterator:
    """Batches across epochs (a tiny split has few)."""
    while True:
        yield from loader


def table(rows: list[Row]) -> str:
    """One line per row, then a verdict line: what a run on this machine will run."""
    lines = [f"{'size':>5}  {'path':<9}  {'runs':<12}  {'ms':>9}  result"]
    for r in rows:
        ms = f"{r.ms:9.2f}" if r.ms is not None else f"{'-':>9}"
        lines.append(f"{r.size:>5}  {r.path:<9}  {r.runs:<12}  {ms}  {r.result}")
    failed = [r for r in rows if r.result.startswith("fails")]
    lines.append("ms: per training step (step), per forward and backward of one FFN's middle (fused FFN), per "
                 "batch (decoder)")
    if failed:
        lines.append(f"{len(failed)} fast path(s) failed here: a run falls back where they fail (one warning line "
                     f"each; --strict-fast-paths stops instead)")
    elif all(r.result == NOT_ON_CPU for r in rows if r.runs in ("graph", "fused", "mixed")):
        lines.append("no GPU here: a run steps eagerly, with PyTorch's FFN ops and DALI's CPU decoder")
    else:
        lines.append("every fast path available here works")
    return "\n".join(lines)
