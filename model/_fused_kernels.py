"""The Triton kernels of ``model.fused_ffn`` (imported by it on first use; see there for what they compute).

Every kernel works on one tile: ``BLOCK_P`` patch pixels (row-major over the grid) by ``BLOCK_C`` channels of one
image ``b``, in a ``(B, n_tokens, C)`` sequence whose first ``prefix`` rows are not on the grid.
"""

import triton
import triton.language as tl


@triton.jit
def hswish(x):
    return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def hswish_grad(x):  # as PyTorch's hardswish_backward: 0 below -3, x/3 + 1/2 up to 3 (inclusive), 1 above
    return tl.where(x < -3.0, 0.0, tl.where(x <= 3.0, x / 3.0 + 0.5, 1.0))


@triton.jit
def this_tile(height, width, channels, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's tile: its pixel block's index, pixels, channels, their masks and the tile's mask (the image,
    or the images, come from the third program index)."""
    pid_p = tl.program_id(0)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < height * width
    cm = c < channels
    return pid_p, p, c, pm, cm, pm[:, None] & cm[None, :]


@triton.jit
def offsets(b, p, c, n_tokens, prefix, channels):
    """Element offsets of the tile's pixels' rows."""
    return b * n_tokens * channels + (prefix + p)[:, None] * channels + c[None, :]


@triton.jit
def load_tap(src, b, p, c, pm, cm, t, n_tokens, prefix, height, width, channels, FLIP: tl.constexpr):
    """``src`` at each pixel of the tile shifted by 3x3 tap ``t`` (the other way if FLIP), zero off the grid, fp32."""
    di = t // 3 - 1
    dj = t % 3 - 1
    if FLIP:
        di = -di
        dj = -dj
    ii = p // width + di
    jj = p % width + dj
    inside = pm & (ii >= 0) & (ii < height) & (jj >= 0) & (jj < width)
    return tl.load(src + offsets(b, ii * width + jj, c, n_tokens, prefix, channels),
                   mask=inside[:, None] & cm[None, :], other=0.0).to(tl.float32)


@triton.jit
def conv_tile(src, w_ptr, b, p, c, pm, cm, n_tokens, prefix, height, width, channels,
              ACT: tl.constexpr, FLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum over the 3x3 taps of w[c, tap] * f(src at the pixel shifted by the tap), f = h-swish if ACT; FLIP
    shifts the other way (the transposed conv of the backward)."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t in tl.static_range(9):
        x = load_tap(src, b, p, c, pm, cm, t, n_tokens, prefix, height, width, channels, FLIP)
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
    pid_p, p, c, pm, cm, mask = this_tile(height, width, channels, BLOCK_P, BLOCK_C)
    b = tl.program_id(2)
    z = conv_tile(h_ptr, w_ptr, b, p, c, pm, cm, n_tokens, prefix, height, width, channels, True, False,
                  BLOCK_P, BLOCK_C)
    tl.store(y_ptr + offsets(b, p, c, n_tokens, prefix, channels), hswish(z).to(y_ptr.dtype.element_ty), mask=mask)
    if pid_p == 0:
        zero_prefix(y_ptr, b, c, cm, n_tokens, prefix, channels, BLOCK_C)


@triton.jit
def grad_out_kernel(gy_ptr, h_ptr, w_ptr, gz_ptr, gw_part_ptr, batch, n_tokens, prefix, height, width, channels,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IMAGES: tl.constexpr):
    """gz = gy * h-swish'(z) at the conv's output (z recomputed) for this tile in IMAGES images, and the weight
    gradient's share of them: the sum over their pixels of gz * h-swish(h at the pixel shifted by each tap), kept in
    registers (a row per tap) and written once, so PyTorch sums batch / IMAGES times fewer rows than one per image."""
    pid_p, p, c, pm, cm, mask = this_tile(height, width, channels, BLOCK_P, BLOCK_C)
    chunk = tl.program_id(2)
    taps = tl.arange(0, 16)  # 9 used
    acc = tl.zeros((16, BLOCK_C), dtype=tl.float32)
    for b in range(chunk * IMAGES, tl.minimum(chunk * IMAGES + IMAGES, batch)):  # the last chunk may be short
        z = conv_tile(h_ptr, w_ptr, b, p, c, pm, cm, n_tokens, prefix, height, width, channels, True, False,
                      BLOCK_P, BLOCK_C)
        offs = offsets(b, p, c, n_tokens, prefix, channels)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gz = tl.where(mask, gy * hswish_grad(z), 0.0)
        tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        for t in tl.static_range(9):
            x = load_tap(h_ptr, b, p, c, pm, cm, t, n_tokens, prefix, height, width, channels, False)
            acc += tl.where(taps[:, None] == t, tl.sum(gz * hswish(x), axis=0)[None, :], 0.0)
    row = (chunk * tl.num_programs(0) + pid_p) * 9
    tl.store(gw_part_ptr + (row + taps[:, None]) * channels + c[None, :], acc, mask=(taps[:, None] < 9) & cm[None, :])


@triton.jit
def grad_in_kernel(gz_ptr, h_ptr, w_ptr, gh_ptr, n_tokens, prefix, height, width, channels,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gh = h-swish'(h) * (the transposed 3x3 conv of gz): every output pixel a tap reached sends its gradient
    back through that tap."""
    pid_p, p, c, pm, cm, mask = this_tile(height, width, channels, BLOCK_P, BLOCK_C)
    b = tl.program_id(2)
    ga = conv_tile(gz_ptr, w_ptr, b, p, c, pm, cm, n_tokens, prefix, height, width, channels, False, True,
                   BLOCK_P, BLOCK_C)
    offs = offsets(b, p, c, n_tokens, prefix, channels)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gh_ptr + offs, (ga * hswish_grad(h)).to(gh_ptr.dtype.element_ty), mask=mask)
    if pid_p == 0:
        zero_prefix(gh_ptr, b, c, cm, n_tokens, prefix, channels, BLOCK_C)
