"""The Triton kernels of ``model.fused_ffn`` (imported by it on first use; see there for what they compute)."""

import triton
import triton.language as tl


@triton.jit
def hswish(x):
    return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def hswish_grad(x):  # as PyTorch's hardswish_backward: 0 below -3, x/3 + 1/2 up to 3 (inclusive), 1 above
    return tl.where(x < -3.0, 0.0, tl.where(x <= 3.0, x / 3.0 + 0.5, 1.0))


@triton.jit
def conv_tile(src, b, p, c, pm, cm, w_ptr, n_tokens, prefix, height, width, channels,
              ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, FLIP: tl.constexpr):
    """sum over the 3x3 taps of w[c, tap] * f(src at the pixel shifted by the tap), f = h-swish if ACT; FLIP
    shifts the other way (the transposed conv of the backward)."""
    i = p // width
    j = p % width
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    base = src + b * n_tokens * channels
    for t in tl.static_range(9):
        di = t // 3 - 1
        dj = t % 3 - 1
        if FLIP:
            ii = i - di
            jj = j - dj
        else:
            ii = i + di
            jj = j + dj
        inside = pm & (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
        offs = (prefix + ii * width + jj)[:, None] * channels + c[None, :]
        x = tl.load(base + offs, mask=inside[:, None] & cm[None, :], other=0.0).to(tl.float32)
        if ACT:
            x = hswish(x)
        w = tl.load(w_ptr + c * 9 + t, mask=cm, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.jit
def zero_prefix(dst, b, c, cm, n_tokens, prefix, channels, BLOCK_C: tl.constexpr):
    for r in range(prefix):
        tl.store(dst + b * n_tokens * channels + r * channels + c, tl.zeros((BLOCK_C,), tl.float32).to(
            dst.dtype.element_ty), mask=cm)


@triton.jit
def forward_kernel(h_ptr, w_ptr, y_ptr, n_tokens, prefix, height, width, channels,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pm, cm = p < height * width, c < channels
    z = conv_tile(h_ptr, b, p, c, pm, cm, w_ptr, n_tokens, prefix, height, width, channels,
                  True, BLOCK_P, BLOCK_C, False)
    offs = b * n_tokens * channels + (prefix + p)[:, None] * channels + c[None, :]
    tl.store(y_ptr + offs, hswish(z).to(y_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])
    if pid_p == 0:
        zero_prefix(y_ptr, b, c, cm, n_tokens, prefix, channels, BLOCK_C)


@triton.jit
def grad_out_kernel(gy_ptr, h_ptr, w_ptr, gz_ptr, gw_part_ptr, n_tokens, prefix, height, width, channels,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gz = gy * h-swish'(z) at the conv's output (z recomputed), and this tile's share of the weight
    gradient, sum over its pixels of gz * h-swish(h at the pixel shifted by each tap)."""
    pid_p, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pm, cm = p < height * width, c < channels
    mask = pm[:, None] & cm[None, :]
    z = conv_tile(h_ptr, b, p, c, pm, cm, w_ptr, n_tokens, prefix, height, width, channels,
                  True, BLOCK_P, BLOCK_C, False)
    offs = b * n_tokens * channels + (prefix + p)[:, None] * channels + c[None, :]
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gz = gy * hswish_grad(z)
    gz = tl.where(mask, gz, 0.0)
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    i = p // width
    j = p % width
    row = (b * tl.num_programs(0) + pid_p) * 9
    for t in tl.static_range(9):
        ii = i + (t // 3 - 1)
        jj = j + (t % 3 - 1)
        inside = pm & (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
        x = tl.load(h_ptr + b * n_tokens * channels + (prefix + ii * width + jj)[:, None] * channels
                    + c[None, :], mask=inside[:, None] & cm[None, :], other=0.0).to(tl.float32)
        part = tl.sum(gz * hswish(x), axis=0)
        tl.store(gw_part_ptr + (row + t) * channels + c, part, mask=cm)


@triton.jit
def grad_in_kernel(gz_ptr, h_ptr, w_ptr, gh_ptr, n_tokens, prefix, height, width, channels,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gh = h-swish'(h) * (the transposed 3x3 conv of gz): every output pixel a tap reached sends its gradient
    back through that tap."""
    pid_p, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pm, cm = p < height * width, c < channels
    mask = pm[:, None] & cm[None, :]
    ga = conv_tile(gz_ptr, b, p, c, pm, cm, w_ptr, n_tokens, prefix, height, width, channels,
                   False, BLOCK_P, BLOCK_C, True)
    offs = b * n_tokens * channels + (prefix + p)[:, None] * channels + c[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gh_ptr + offs, (ga * hswish_grad(h)).to(gh_ptr.dtype.element_ty), mask=mask)
    if pid_p == 0:
        zero_prefix(gh_ptr, b, c, cm, n_tokens, prefix, channels, BLOCK_C)
