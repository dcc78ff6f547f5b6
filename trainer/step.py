"""One training step — batch augmentation, forward, loss, backward, AdamW, EMA, the non-finite flag — run eagerly,
compiled, or captured whole in one CUDA graph per curriculum stage.

The trainer, ``--profile``, ``tools/bench.py`` and ``tools/gpu_check.py`` all time this object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from model import build_model, set_grid
from trainer.augment import BatchAugment
from trainer.config import TrainConfig
from trainer.resize import resize_for_stage

STEP_MODES = ("auto", "eager", "graph", "compile")
# Eager steps before a capture: cuDNN autotuning, the optimizer's state and the allocator's pools settle first
# (PyTorch's CUDA-graph notes). They are real training steps on real batches.
GRAPH_WARMUP_STEPS = 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the card has it, else fp16 (with a grad scaler); none on the CPU."""
    if device.type != "cuda" or name == "off":
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_step_mode(name: str, device: torch.device, amp: torch.dtype | None,
                      distributed: bool = False) -> tuple[str, str | None]:
    """The mode that runs and, where it is not the one asked for, one line saying why.

    auto: a captured step on CUDA (bf16 or fp32), eager elsewhere. A captured step cannot hold fp16's grad scaler
    (it reads its overflow flag on the host) and needs CUDA; those fall back to eager. Under DDP (more than one
    process) the step is not captured yet: auto compiles on CUDA (DDP's buckets become graph breaks), and an
    explicit graph falls back to compile.
    """
    if name not in STEP_MODES:
        raise ValueError(f"unknown step mode {name!r}; choose from {', '.join(STEP_MODES)}")
    if distributed and name in ("auto", "graph") and device.type == "cuda":
        note = "--step graph: a captured step does not run under DDP yet; compiling the step instead"
        return "compile", note if name == "graph" else None
    if name == "auto":
        return ("graph" if device.type == "cuda" and amp != torch.float16 else "eager"), None
    if name == "graph" and device.type != "cuda":
        return "eager", "--step graph: CUDA graphs need a CUDA device; running the step eagerly"
    if name == "graph" and amp == torch.float16:
        return "eager", ("--step graph: fp16's grad scaler checks for overflow on the host, which a captured step "
                         "cannot do; running the step eagerly (use --amp bf16 to capture)")
    return name, None


def resolve_fused_ffn(name: str, device: torch.device, model: str, act: str) -> bool:
    """Run the locality FFN's middle as one Triton kernel? auto: on CUDA, for the h-swish locality models (the
    kernel's case); never on the CPU, where PyTorch's ops are the reference path. ``on`` was checked at parse time."""
    from model import LOCALITY_MODELS, fused_ffn

    if name == "off" or model not in LOCALITY_MODELS or act != "hswish":
        return False
    return device.type == "cuda" and (name == "on" or fused_ffn.available())


def configure_backends(device: torch.device) -> None:
    """What every step on CUDA runs with, trainer and benchmarks alike: cuDNN autotuning for the static shapes of a
    stage, TF32 for whatever runs outside autocast."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def weight_decay_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (norms, biases) nor the model's ``no_weight_decay()`` names
    (position embedding, class token)."""
    return param_groups_weight_decay(net, weight_decay, no_weight_decay_list=net.no_weight_decay())


def make_optimizer(net: nn.Module, weight_decay: float, lr: float, device: torch.device,
                   graph: bool) -> torch.optim.AdamW:
    """AdamW, fused on CUDA; for a captured step also capturable (TrainStep then makes its lr a device tensor)."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(weight_decay_groups(net, weight_decay), lr=lr, fused=cuda, capturable=graph and cuda)


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with plain-float learning rates, so a checkpoint does not depend on the step mode."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load moments and step counts from any step mode's checkpoint, keeping this optimizer's own kind
    (fused, capturable, a tensor or float lr): a run captured on a GPU resumes eagerly on the CPU and back."""
    own = [{k: g[k] for k in ("lr", "fused", "capturable", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, own, strict=True):
        group.update(kept)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            s = optimizer.state.get(p)
            if s and "step" in s:  # fused/capturable keep it on the device, the others on the host
                s["step"] = s["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu")


class Diverged(RuntimeError):
    """The loss became non-finite (and no fp16 grad scaler is there to skip the step)."""


@dataclass
class StepTimes:
    """What the current stage's preparation cost so far (seconds of host wall time, synced at the capture)."""

    steps: int = 0  # steps run at this stage
    capture_s: float = 0.0


def fallback_mode(device: torch.device) -> tuple[str, str]:
    """What a step that cannot be captured runs as, and why: compiled where Inductor has its GPU backend (Triton),
    which recovers most of what the capture saved (the step's small ops fused); eager otherwise."""
    from model import fused_ffn

    if device.type == "cuda" and fused_ffn.available():
        return "compile", "Inductor fuses the step's small kernels, most of what the capture saved"
    return "eager", "no Triton here for torch.compile's GPU backend"


class GraphRunner:
    """The captured step: ``GRAPH_WARMUP_STEPS`` eager steps on a side stream (cuDNN autotuning, the optimizer's
    state and the allocator's pools settle first), then the step captured in one ``torch.cuda.CUDAGraph`` on static
    copies of a batch, then replays with each batch copied into those copies.

    The optimizer's lr becomes one device tensor shared by every group (capturable AdamW reads it on the device),
    which the host sets before each replay. ``TrainStep.graph_runner`` is the seam tests replace to inject a
    capture failure on the CPU."""

    def __init__(self, step: TrainStep) -> None:
        if step.device.type != "cuda" or step.amp == torch.float16:
            raise ValueError("a captured step needs CUDA and bf16 or fp32 (see resolve_step_mode)")
        if step.ddp:
            raise ValueError("a captured step does not run under DDP yet (see resolve_step_mode)")
        self.step = step
        lr = step.optimizer.param_groups[0]["lr"]
        step._lr = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), device=step.device)
        for group in step.optimizer.param_groups:
            group["lr"] = step._lr
        self.side = torch.cuda.Stream(step.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            return self.replay(images, targets)
        if self.step.times.steps < GRAPH_WARMUP_STEPS:
            return self.warmup(images, targets)
        return self.capture(images, targets)

    def replay(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert self.graph is not None and self.static is not None and self.static_loss is not None
        for static, given in zip(self.static, (images, targets), strict=True):
            if static.shape != given.shape:  # copy_ would broadcast a smaller batch silently
                raise ValueError(f"captured for a batch of shape {tuple(static.shape)}, given "
                                 f"{tuple(given.shape)}: call prepare() when the batch changes")
            static.copy_(given)
        self.graph.replay()
        return self.static_loss.clone()  # the next replay overwrites the static loss

    def warmup(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """An eager step on a side stream, as capture requires (its allocations then come from that stream)."""
        device = self.step.device
        self.step.optimizer.zero_grad(set_to_none=True)
        self.side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.side):
            loss = self.step._step(images, targets)
        torch.cuda.current_stream(device).wait_stream(self.side)
        return loss

    def capture(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Capture the step on static copies of this batch, then replay it once: this batch is trained on."""
        start = time.perf_counter()
        self.static = (torch.empty_like(images), torch.empty_like(targets))  # same strides: channels-last stays
        self.static[0].copy_(images)
        self.static[1].copy_(targets)
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's own pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's worker threads keep decoding (and allocating) on the GPU while this thread captures;
        # "global" would fail their CUDA calls for the duration of the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_loss = self.step._step(*self.static)
        self.graph = graph
        graph.replay()
        loss = self.static_loss.clone()
        torch.cuda.synchronize(self.step.device)  # once per stage: the capture's cost is then measured, not guessed
        self.step.times.capture_s = time.perf_counter() - start
        return loss

    def reset(self) -> None:
        """Free the graph and its memory pool (the gradients live there: set to None)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.static = self.static_loss = None
        self.step.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


Fallback = Callable[[str, str, BaseException, str], None]  # (failed mode, new mode, error, why the new mode)


class TrainStep:
    """Forward, loss, backward, the optimizer step, the EMA update and the non-finite flag, for one stage's shape.

    ``mode``: "eager"; "compile" (``torch.compile`` of the model, static shapes, one graph per stage); "graph" (the
    whole step captured in one CUDA graph after ``GRAPH_WARMUP_STEPS`` eager steps, see ``GraphRunner``;
    ``prepare`` at a stage change frees it and the next steps recapture).

    ``on_fallback`` (None: errors propagate, as the benchmarks want): a failure while warming up, capturing or
    replaying the graph, or in a compiled step's first call at a stage (where it compiles), is handed to it, then
    the step runs on as ``fallback_mode`` (graph) or eager (compile), the same batch trained on at once: no step is
    lost or counted twice, and the optimizer state carries over. ``on_fallback`` may raise to forbid the fallback.

    Batch augmentation (erasing, mixup/cutmix) draws its random numbers on the host, so it runs before the graph,
    outside it: every step gets fresh draws. Drop-path draws on the device from PyTorch's graph-safe generator,
    whose offset advances at each replay.
    """

    graph_runner: type[GraphRunner] = GraphRunner

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, augment: BatchAugment, *,
                 device: torch.device, amp: torch.dtype | None, mode: str = "eager",
                 ema: ModelEmaV3 | None = None, ddp: bool = False, on_fallback: Fallback | None = None) -> None:
        if mode not in ("eager", "graph", "compile"):
            raise ValueError(f"unknown step mode {mode!r}")
        self.net, self.optimizer, self.augment, self.ema = net, optimizer, augment, ema
        self.device, self.amp, self.mode, self.ddp = device, amp, mode, ddp
        self.on_fallback = on_fallback
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        # Non-finite losses are flagged on the device (no sync) and read at log intervals and checkpoints.
        # With fp16 the grad scaler skips such steps itself.
        self.nonfinite = None if self.scaler.is_enabled() else torch.zeros((), dtype=torch.bool, device=device)
        self.steps = 0  # the run's step count (the EMA's first updates copy); the trainer sets it on resume
        self.times = StepTimes()
        self._lr: torch.Tensor | None = None  # a captured step's lr, on the device (set by GraphRunner)
        self._runner: GraphRunner | None = None
        self._use(mode)

    def _use(self, mode: str) -> None:
        """Run the step as ``mode`` from now on (at construction, and at a fallback)."""
        if mode == "compile":
            # Static shapes, one graph per stage: a stage change recompiles once, steps never do.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        self.mode = mode
        self.forward = self._wrap()
        self._runner = self.graph_runner(self) if mode == "graph" else None

    def _wrap(self) -> nn.Module:
        """What the step calls: the model, under DDP when data-parallel (then compiled: wrap, then compile)."""
        module: nn.Module = self.net
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            # every rank holds the same weights (DDP broadcasts rank 0's here); gradients are averaged in buckets
            # as the backward produces them
            module = DistributedDataParallel(self.net, device_ids=[self.device] if self.device.type == "cuda"
                                             else None, gradient_as_bucket_view=True)
        return torch.compile(module, dynamic=False) if self.mode == "compile" else module

    @classmethod
    def for_config(cls, cfg: TrainConfig, num_classes: int, device: torch.device, image_size: int,
                   mode: str | None = None, ddp: bool = False, fused_ffn: bool | None = None) -> TrainStep:
        """The model, optimizer, augmentation and EMA that ``cfg`` asks for, on ``device`` (what the trainer
        builds; the profiler and the benchmarks build the same). ``mode``: already resolved, else from ``cfg``;
        ``fused_ffn``: likewise. ``ddp``: data-parallel under a process group (torchrun)."""
        configure_backends(device)
        amp = resolve_amp(cfg.amp, device)
        if mode is None:
            mode, _ = resolve_step_mode(cfg.step, device, amp, distributed=ddp)
        if fused_ffn is None:
            fused_ffn = resolve_fused_ffn(cfg.fused_ffn, device, cfg.model, cfg.act)
        net = build_model(cfg.model, num_classes=num_classes, image_size=image_size, act=cfg.act,
                          drop_path=cfg.drop_path, fused_ffn=fused_ffn)
        net = net.to(device, memory_format=torch.channels_last).train()
        optimizer = make_optimizer(net, cfg.weight_decay, cfg.peak_lr, device, graph=mode == "graph")
        ema = ModelEmaV3(net, decay=cfg.ema) if cfg.ema else None
        return cls(net, optimizer, BatchAugment(cfg, num_classes, device), device=device, amp=amp, mode=mode,
                   ema=ema, ddp=ddp)

    @property
    def captured(self) -> bool:
        return self._runner is not None and self._runner.captured

    @property
    def settle_steps(self) -> int:
        """Steps a stage takes to reach the steady step: warm-up and capture for a graph, one otherwise."""
        return GRAPH_WARMUP_STEPS + 1 if self.mode == "graph" else 1

    @property
    def settling(self) -> bool:
        """True until the step reaches its steady form at this stage: the warm-up steps and the capture in graph
        mode, the first (compiling or autotuning) step otherwise."""
        if self._runner is not None:
            return not self._runner.captured
        return self.times.steps == 0

    def prepare(self) -> None:
        """A stage change (new image size or batch, a new position-embedding Parameter): drop the captured graph
        and its memory pool; the next steps warm up and capture again. Eager and compiled steps need nothing."""
        self.times = StepTimes()
        if self._runner is not None and self._runner.captured:
            self._runner.reset()

    def move_to(self, image_size: int) -> None:
        """A stage change to ``image_size``: the captured graph is dropped first (it points at the old position
        embedding), then the embedding is resized with its optimizer state, and the EMA copy's grid with it."""
        self.prepare()
        resize_for_stage(self.net, self.optimizer, image_size)
        if self.ema is not None:
            set_grid(self.ema.module, image_size)
        if self.ddp:  # DDP holds the old position-embedding Parameter: wrap the resized model anew
            self.forward = self._wrap()

    def set_lr(self, lr: float) -> None:
        if self._lr is not None:
            self._lr.fill_(lr)  # a device-side write, ordered before the next replay; no sync
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        """One optimizer step on this batch. Returns the loss as a device tensor (never synced here)."""
        if lr is not None:
            self.set_lr(lr)
        images, targets = self.augment(images, labels)  # host-side draws: outside any graph
        while True:
            try:
                loss = self._runner(images, targets) if self._runner is not None else self._step(images, targets)
                break
            except Exception as error:  # noqa: BLE001 - whatever the fast path raised is reported, then passed by
                if not self._may_fall_back():
                    raise
                self._fall_back(error)  # then this same batch, the next mode
        self.steps += 1
        self.times.steps += 1
        return loss

    def _may_fall_back(self) -> bool:
        """A captured step at any point; a compiled one at its first call at a stage (where it compiles)."""
        return self.on_fallback is not None and (self.mode == "graph" or (self.mode == "compile" and self.settling))

    def _fall_back(self, error: BaseException) -> None:
        failed = self.mode
        to, why = fallback_mode(self.device) if failed == "graph" else ("eager", "")
        assert self.on_fallback is not None
        self.on_fallback(failed, to, error, why)  # raises where the fallback is forbidden
        if self._runner is not None:
            try:
                self._runner.reset()
            except Exception:  # noqa: BLE001, S110 - a graph that failed to capture may not free cleanly
                pass
        self.optimizer.zero_grad(set_to_none=True)
        self.times = StepTimes()  # the new mode settles (compiles) at its first step
        self._use(to)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The step itself: what a graph captures, and what eager and compiled modes run as is. Host-side values
        computed here (the EMA's decay from ``self.steps``) are frozen into a capture: they must not change during a
        stage (the EMA's decay is constant from its third step on, and a capture comes after three warm-up steps)."""
        graph = self.mode == "graph"  # the autocast cache must not outlive a capture
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None, cache_enabled=not graph):
            loss = self.augment.criterion(self.forward(images), targets)
        if not graph:  # a captured step's backward writes (not adds) the gradients it allocated at capture
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.net, step=self.steps)
        if self.nonfinite is not None:
            self.nonfinite |= ~torch.isfinite(loss.detach())
        return loss.detach()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def diverged(self) -> bool:
        """Has any loss since the start been non-finite? (A host sync: call at log intervals.)"""
        return self.nonfinite is not None and bool(self.nonfinite.item())

    def check_finite(self, step: int) -> None:
        """Raise ``Diverged`` if any loss up to ``step`` was non-finite (a host sync)."""
        if self.diverged():
            raise Diverged(f"the loss became non-finite by step {step}")
