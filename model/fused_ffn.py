"""The middle of the locality FFN fused: h-swish -> 3x3 depth-wise conv (no bias) -> h-swish, in Triton.

PyTorch's path runs it as three passes over the 4D-wide hidden tensor forward (activation, cuDNN's depth-wise conv,
activation) and more backward, each a full read and write of it; the arithmetic is tiny. Here:

- forward: one pass. Each program reads a tile of pixels x channels and its 3x3 neighbourhood (served from cache),
  applies h-swish to what it reads, convolves in fp32, applies h-swish, writes once. Nothing is saved but the input.
- backward: two passes. The first recomputes the conv output (cheaper than storing it), forms the gradient at the
  conv output, writes it, and reduces the weight gradient in registers, per tile over 8 images, in fp32 (PyTorch
  adds those partial sums: the result is deterministic, no atomics). The second forms the input gradient from it
  (the transposed 3x3 conv) times the first h-swish's derivative at the input.

The tensors are token sequences as the FFN holds them, ``(B, P + H*W, C)``: ``P`` prefix (class) tokens, then the
patch grid row-major, channels contiguous. The prefix rows of the output (and of the input gradient) are zero: fc2
has no bias, so the class token gets nothing added, exactly as when it skips the FFN, and the block needs no split
and concatenation of its tokens.

It is registered as ``torch.library`` custom ops (``vitbudget::locality_dwconv`` and its backward) with an autograd
formula and fake (meta) implementations: autograd differentiates it, ``torch.compile`` keeps it as one opaque node
(Inductor fuses around it; it does not need to see into it, and an opaque op keeps compile time flat), and a CUDA
graph captures its launches like any kernel's. Kernels run on CUDA, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.grid_vit import grid_to_tokens, split_prefix, tokens_to_grid

BLOCK_P = 32  # pixels per program
BLOCK_C = 64  # channels per program (contiguous in memory: vectorised loads)
GRAD_IMAGES = 8  # images per program in the weight gradient's pass: fewer partial rows to write and sum


def unfused(patches: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The same middle in PyTorch's ops, as the unfused locality FFN runs it on its patch tokens (B, H*W, C)."""
    x = tokens_to_grid(F.hardswish(patches), grid)
    return grid_to_tokens(F.hardswish(F.conv2d(x, weight.to(x.dtype), padding=1, groups=x.shape[1])))


def reference(h: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """What the fused op computes, in PyTorch ops, on the same ``(B, P + H*W, C)`` layout."""
    prefix, patches = split_prefix(h, grid)
    return torch.cat([torch.zeros_like(prefix), unfused(patches, weight, grid)], dim=1)


def available() -> bool:
    """Is Triton installed (it ships with PyTorch's Linux wheels)? The kernels then run on any CUDA device."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): the kernels then run on CPU tensors, slowly."""
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


@functools.cache
def _kernels(interpret: bool) -> Any:
    """The Triton kernels, imported on first use. Triton decides at definition whether a kernel is compiled or
    interpreted, so with the interpreter on (the CPU tests) a second copy of the module is loaded under its own
    name, and a process can hold both."""
    if not interpret:
        return importlib.import_module("model._fused_kernels")
    name = "model._fused_kernels_interpreted"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_fused_kernels.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _check(h: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> None:
    if h.dim() != 3 or not h.is_contiguous():
        raise ValueError(f"locality_dwconv: expected a contiguous (B, P + H*W, C) tensor, got {tuple(h.shape)}")
    b, n, c = h.shape
    if n < height * width or tuple(weight.shape) != (c, 1, 3, 3):
        raise ValueError(f"locality_dwconv: {tuple(h.shape)} tokens and a weight of {tuple(weight.shape)} do not "
                         f"fit a {height}x{width} grid of {c} channels")


def _grid(b: int, height: int, width: int, c: int) -> tuple[int, int, int]:
    return (-(-height * width // BLOCK_P), -(-c // BLOCK_C), b)


@torch.library.custom_op("vitbudget::locality_dwconv", mutates_args=())
def locality_dwconv(h: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """h-swish -> 3x3 depth-wise conv (``weight``: (C, 1, 3, 3), no bias, zero padding) -> h-swish on the patch
    rows of ``h`` (B, P + H*W, C); the P prefix rows of the result are zero."""
    _check(h, weight, height, width)
    kernels = _kernels(interpreting())
    b, n, c = h.shape
    y = torch.empty_like(h)
    w = weight.detach().contiguous()
    kernels.forward_kernel[_grid(b, height, width, c)](h, w, y, n, n - height * width, height, width, c,
                                               BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y


@locality_dwconv.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.empty_like(h)


@torch.library.custom_op("vitbudget::locality_dwconv_backward", mutates_args=())
def locality_dwconv_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, height: int,
                             width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``locality_dwconv`` with respect to ``h`` and ``weight`` (fp32 sums, the weight's dtype)."""
    kernels = _kernels(interpreting())
    b, n, c = h.shape
    grad = grad.contiguous()
    w = weight.detach().contiguous()
    grid = _grid(b, height, width, c)
    prefix = n - height * width
    gz = torch.empty_like(h)
    chunks = -(-b // GRAD_IMAGES)
    parts = torch.empty(chunks * grid[0], 9, c, device=h.device, dtype=torch.float32)
    kernels.grad_out_kernel[(grid[0], grid[1], chunks)](grad, h, w, gz, parts, b, n, prefix, height, width, c,
                                                       BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, IMAGES=GRAD_IMAGES)
    gh = torch.empty_like(h)
    kernels.grad_in_kernel[grid](gz, h, w, gh, n, prefix, height, width, c, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    gw = parts.sum(0).t().reshape(c, 1, 3, 3).to(weight.dtype)
    return gh, gw


@locality_dwconv_backward.register_fake
def _(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, height: int,
      width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    h, weight, height, width = inputs
    ctx.save_for_backward(h, weight)
    ctx.grid = (height, width)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    h, weight = ctx.saved_tensors
    gh, gw = locality_dwconv_backward(grad, h, weight, *ctx.grid)
    return gh, gw, None, None


locality_dwconv.register_autograd(_backward, setup_context=_setup_context)


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative error ``self_check`` accepts: 25 roundings of ``dtype`` (the input gradient passes
    through a ``dtype`` intermediate: measured 0.045 in bf16, 0.007 in fp16, as PyTorch's own ops in that dtype
    are off by 0.02 and 0.012), and at least 5e-3 (fp32 against a reference that may run in TF32 on a GPU). A
    wrong kernel is off by order one: one 3x3 tap missing is a third of the output."""
    return max(25 * torch.finfo(dtype).eps, 5e-3)


def self_check(weight: torch.Tensor, batch: int, grid: tuple[int, int], prefix: int, dtype: torch.dtype,
               seed: int = 0) -> float:
    """Run the fused op, forward and backward, on a random ``(batch, prefix + H*W, C)`` input of ``dtype`` (the
    shapes and dtype a stage trains with, so the same kernels are compiled) against PyTorch's ops in fp32 on the
    same input, and return the largest relative error (L2 norm) of the output and of both gradients.

    What the kernels raise (a Triton compile or launch error) is raised. It trains nothing: ``weight`` is copied."""
    height, width = grid
    channels = weight.shape[0]
    g = torch.Generator(device=weight.device).manual_seed(seed)
    shape = (batch, prefix + height * width, channels)
    # spread over h-swish's three pieces (below -3, the curve, above 3) and both signs of the conv's output
    h = (3 * torch.randn(shape, generator=g, device=weight.device)).to(dtype).requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = locality_dwconv(h, w, height, width)
    upstream = torch.randn(out.shape, generator=g, device=weight.device).to(out.dtype)
    out.backward(upstream)

    h32 = h.detach().float().requires_grad_(True)
    w32 = w.detach().float().requires_grad_(True)
    ref = reference(h32, w32, grid)
    ref.backward(upstream.float())

    def error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
        if got is None or want is None:
            return float("inf")
        got = got.detach().float()
        if not torch.isfinite(got).all():
            return float("inf")
        return float((got - want).norm() / want.norm().clamp_min(1e-12))

    return max(error(out, ref.detach()), error(h.grad, h32.grad), error(w.grad, w32.grad))


def disagreement(weight: torch.Tensor, batch: int, grid: tuple[int, int], prefix: int, dtype: torch.dtype,
                 seed: int = 0) -> tuple[float, str | None]:
    """``self_check``'s error, and what is wrong when it exceeds the dtype's ``tolerance`` (None when the kernels
    agree with PyTorch's ops). What the kernels raise is raised."""
    error = self_check(weight, batch, grid, prefix, dtype, seed=seed)
    limit = tolerance(dtype)
    if error <= limit:
        return error, None
    side = f"{grid[0]}x{grid[1]}"  # NaN lands here too: it is not <= anything
    return error, (f"its result differs from PyTorch's ops by {error:.3g} (relative, on a {side} grid, "
                   f"{str(dtype).removeprefix('torch.')}; tolerance {limit:.3g})")
