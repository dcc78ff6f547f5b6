"""The fused locality FFN (model/fused_ffn.py) against PyTorch's ops: on a GPU where there is one, else on the CPU
through Triton's interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from model import build_model
from model import fused_ffn as ff
from model.locality_vit import LocalityFeedForward, set_fused
from trainer.config import ConfigError, parse_args
from trainer.step import resolve_fused_ffn

pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run here")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (batch, grid height, grid width, channels, prefix tokens): odd grids, batch 1, channels over one block and ragged,
# a batch over one weight-gradient chunk (model.fused_ffn.GRAD_IMAGES) and ragged
SHAPES = [(1, 2, 2, 8, 1), (2, 7, 7, 24, 1), (1, 14, 14, 70, 0), (3, 3, 5, 130, 2), (10, 2, 3, 8, 1)]


if not torch.cuda.is_available() and not ff.interpreting():
    pytest.skip("no CUDA device, and Triton's interpreter is off (tests/conftest.py turns it on for the CPU)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def exact_fp32_reference() -> Iterator[None]:
    """On a GPU, the reference's cuDNN conv and matmuls in true fp32 (PyTorch lets cuDNN use TF32 by default).

    Saved and restored with PyTorch's own setters, not monkeypatched: torch's backend flags are served by a module
    ``__getattr__``, which pytest 9's monkeypatch undoes as a missing attribute (a ``delattr`` that fails). The
    legacy setters, not ``fp32_precision``: PyTorch refuses to read the flags once the two APIs are mixed, and the
    trainer (``configure_backends``) and Inductor use the legacy ones."""
    cudnn = torch.backends.cudnn
    saved_matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(saved_matmul)


def _inputs(b: int, height: int, width: int, c: int, prefix: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(b * 1000 + height * 10 + c)
    # values across h-swish's three pieces (below -3, the curve, above 3)
    h = (torch.randn(b, prefix + height * width, c, generator=g) * 2.5).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(c, 1, 3, 3, generator=g) * 0.5).to(DEVICE).requires_grad_()
    return h, w


@pytest.mark.parametrize(("b", "height", "width", "c", "prefix"), SHAPES)
def test_forward_and_gradients_match_pytorch(b, height, width, c, prefix):
    h, w = _inputs(b, height, width, c, prefix)
    y = ff.locality_dwconv(h, w, height, width)
    ref = ff.reference(h, w, (height, width))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not y[:, :prefix].any()  # the class token's rows: nothing to add
    grad = torch.randn_like(y)
    gh, gw = torch.autograd.grad(y, (h, w), grad)
    rh, rw = torch.autograd.grad(ref, (h, w), grad)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)  # summed over the batch and the grid
    assert gw.dtype == w.dtype and gh.dtype == h.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_and_out_with_fp32_accumulation(dtype):
    b, height, width, c, prefix = 2, 7, 7, 24, 1
    h, w = _inputs(b, height, width, c, prefix, dtype)
    y = ff.locality_dwconv(h, w, height, width)
    assert y.dtype == dtype
    ref = ff.reference(h.float(), w, (height, width))  # the same half-precision inputs, computed in fp32
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # one rounding of the output
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    grad = torch.randn(y.shape).to(DEVICE, dtype)
    gh, gw = torch.autograd.grad(y, (h, w), grad)
    rh, rw = torch.autograd.grad(ref, (h, w), grad.float())
    # h-swish's derivative jumps at -3 and 3 (0 to -1/2, 3/2 to 1): a conv output within rounding of a jump may take
    # either side in two correct implementations, so a few input gradients may differ by up to a jump's worth
    off = ~torch.isclose(gh.float(), rh.float(), rtol=4 * tol, atol=4 * tol)
    assert off.float().mean() <= 0.005, f"{int(off.sum())} of {off.numel()} input gradients differ"
    torch.testing.assert_close(gw, rw, rtol=4 * tol, atol=4 * tol * b * height * width)


def test_the_custom_op_is_registered_consistently():
    """torch.library's own checks: schema, fake (meta) kernel, autograd formula, and what torch.compile needs."""
    h, w = _inputs(1, 3, 3, 8, 1)
    torch.library.opcheck(ff.locality_dwconv, (h, w, 3, 3))


def test_compile_traces_the_op_and_its_backward_as_one_node():
    torch.manual_seed(0)
    ffn = LocalityFeedForward(16, 32).to(DEVICE)
    set_fused(ffn, True)
    x = torch.randn(2, 1 + 4 * 4, 16, device=DEVICE, requires_grad=True)

    def loss(module: nn.Module) -> tuple[torch.Tensor, ...]:
        out = module(x, (4, 4))
        return (out, *torch.autograd.grad(out.square().sum(), (x, ffn.dwconv.weight)))

    eager = loss(ffn)
    compiled = loss(torch.compile(ffn, backend="aot_eager", fullgraph=True))  # fake kernels, autograd: no break
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("image_size", [48])  # a 3x3 patch grid (the op tests cover 2x2 to 14x14)
def test_a_fused_model_computes_the_unfused_model_and_shares_its_weights(image_size):
    torch.manual_seed(0)
    plain = build_model("vit_local_test_patch16", num_classes=3, image_size=image_size).to(DEVICE)
    fused = build_model("vit_local_test_patch16", num_classes=3, image_size=image_size, fused_ffn=True).to(DEVICE)
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, image_size, image_size, device=DEVICE)
    outs, grads = [], []
    for net in (plain, fused):
        out = net(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in net.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_gelu_models_and_the_cpu_do_not_take_the_kernel():
    with pytest.raises(ValueError, match="h-swish"):
        set_fused(build_model("vit_local_test_patch16", num_classes=3, act="gelu"), True)
    with pytest.raises(ValueError, match="locality models"):
        build_model("deit_tiny_patch16_224", num_classes=3, fused_ffn=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_fused_ffn("auto", cuda, "vit_local_small_patch16", "hswish")
    assert not resolve_fused_ffn("auto", cpu, "vit_local_small_patch16", "hswish")
    assert not resolve_fused_ffn("auto", cuda, "vit_local_small_patch16", "gelu")
    assert not resolve_fused_ffn("auto", cuda, "deit_small_patch16_224", "hswish")
    assert not resolve_fused_ffn("off", cuda, "vit_local_small_patch16", "hswish")


@pytest.mark.parametrize(("flags", "needle"), [
    (["--fused-ffn", "on", "--device", "cpu"], "runs on CUDA"),
    (["--fused-ffn", "on", "--act", "gelu"], "h-swish locality FFN"),
    (["--fused-ffn", "on", "--model", "deit_small_patch16_224"], "h-swish locality FFN"),
])
def test_fused_ffn_on_where_it_cannot_run_is_refused(flags, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_args(["--data", "x", *flags])
