"""Triton NVFP4 quantizer, bit-identical to `format.quantize_ref`.

One pass over the input: each program loads BLOCK_B consecutive 16-value blocks (even and
odd elements as two tiles), computes the block maxima, the E4M3 scales and the E2M1 codes in float32 registers, and writes packed
bytes and row-major scale bytes. The E4M3 rounding is done with integer bit operations
(round to nearest even on the float32 bits) rather than Triton's fp8 cast, so the same code
is exact under TRITON_INTERPRET=1 on the CPU and on every GPU generation; the clamp to
[2**-6, 448] before it means only normal E4M3 values occur, which keeps that rounding a
three-line expression. Divisions are `tl.math.div_rn` (IEEE, round to nearest): Triton's
`/` on float32 is not correctly rounded on the GPU (seen on an H100: 1-ulp differences).

The global scale is read from device memory (never synced to the host): given by the
caller, or computed by `_amax_kernel` (per-program partial maxima of |x| over finite
values) and `_global_scale_kernel` (their max, / 2688 in IEEE float32, floored).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.format import (
    BLOCK,
    NVFP4Tensor,
    check_global_scale,
    check_input,
    swizzled_scale_shape,
)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(x: torch.Tensor, what: str = "input") -> None:
    """Triton needs a CUDA tensor, or any CPU tensor when interpreting."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpreting():
        return
    raise KernelError(
        f"{what}: Triton kernels need a CUDA tensor (got device {x.device}); "
        "set TRITON_INTERPRET=1 to run them on the CPU")


@triton.jit
def _e4m3_round(s):
    """float32 in [2**-6, 448] -> (decoded float32, E4M3 byte as int32), RNE."""
    bits = s.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    dec = rounded.to(tl.float32, bitcast=True)
    byte = ((((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)).to(tl.int32)
    return dec, byte


@triton.jit
def _amax_kernel(x_ptr, part_ptr, n, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK_N):
        offs = pid.to(tl.int64) * CHUNK + i + tl.arange(0, BLOCK_N)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
        acc = tl.maximum(acc, tl.where(a < float("inf"), a, 0.0))  # drops inf and NaN
    tl.store(part_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def _global_scale_kernel(part_ptr, n, g_ptr, BLOCK_N: tl.constexpr):
    """g = max(amax / 2688, 2**-120), IEEE float32 division as in `format`."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, n, BLOCK_N):
        offs = i + tl.arange(0, BLOCK_N)
        acc = tl.maximum(acc, tl.load(part_ptr + offs, mask=offs < n, other=0.0))
    amax = tl.max(acc, axis=0)
    tl.store(g_ptr, tl.maximum(tl.math.div_rn(amax, 2688.0), 7.52316384526264e-37))  # 2**-120


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e2m1_codes(x, r):
    """E2M1 codes of x * r (r per row), clamped to +-6, nearest, ties to the even code;
    the sign comes from x's bits (so -0.0 and negatives rounding to 0 give 0x8).

    The grid has step 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: scale by 2, 1 or 1/2 (exact),
    round to an integer with one float add of 1.5 * 2**23 (IEEE round to nearest even:
    ties go to the even code) and offset: code = rint(|y| * m) + o."""
    ay = tl.minimum(tl.abs(x * r[:, None]), 6.0)
    lo = ay < 2.0
    mid = ay < 4.0
    m = tl.where(lo, 2.0, tl.where(mid, 1.0, 0.5))
    o = tl.where(lo, 0, tl.where(mid, 2, 4))
    q = (ay * m + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return (q + o) | ((x.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.int32)


@triton.jit
def _nvfp4_quant_kernel(
    x_ptr, data_ptr, scale_ptr, g_ptr, n_blocks, KB,
    BF16_PAIRS: tl.constexpr, SWIZZLE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """x is contiguous [M, K]: the 16-value blocks are consecutive runs of memory, so a
    program takes BLOCK_B of them (block b -> row b // KB). Even and odd elements are held
    as two [BLOCK_B, 8] tiles, so byte j = code(even j) | code(odd j) << 4 needs no
    reshuffle; bfloat16 input is read as int32 pairs (one 32-byte row per block) and
    widened by shifts. 64-bit arithmetic only for the program's base offsets."""
    b0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    bl = tl.arange(0, BLOCK_B)
    bmask = bl < n_blocks - b0
    j = tl.arange(0, 8)
    if BF16_PAIRS:
        v = tl.load(x_ptr + b0 * 8 + (bl[:, None] * 8 + j[None, :]), mask=bmask[:, None], other=0)
        v = v.to(tl.uint32, bitcast=True)
        xe = (v << 16).to(tl.float32, bitcast=True)
        xo = (v & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        offs = bl[:, None] * 16 + 2 * j[None, :]
        xe = tl.load(x_ptr + b0 * 16 + offs, mask=bmask[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + b0 * 16 + (offs + 1), mask=bmask[:, None], other=0.0).to(tl.float32)
    g = tl.load(g_ptr)

    # NaN-propagating max: a block with a NaN has a NaN amax, and nothing else is needed
    block_amax = tl.reduce(tl.maximum(tl.abs(xe), tl.abs(xo), propagate_nan=tl.PropagateNan.ALL),
                           1, _max_nan)
    block_nan = block_amax != block_amax

    s = tl.math.div_rn(tl.math.div_rn(block_amax, 6.0), g)
    s = tl.minimum(tl.maximum(tl.where(block_nan, 1.0, s), 0.015625), 448.0)  # +inf -> 448
    s_dec, s_byte = _e4m3_round(s)
    s_byte = tl.where(block_nan, 0x7F, s_byte)

    r = tl.math.div_rn(tl.math.div_rn(1.0, g), s_dec)  # (1/g) / s, as the reference
    packed = _e2m1_codes(xe, r) | (_e2m1_codes(xo, r) << 4)
    packed = tl.where(block_nan[:, None], 0, packed).to(tl.uint8)
    tl.store(data_ptr + b0 * 8 + (bl[:, None] * 8 + j[None, :]), packed, mask=bmask[:, None])

    if SWIZZLE:  # 128x4 blocked layout of torch._scaled_mm (format.swizzle_scales)
        b = b0 + bl
        row = b // KB
        col = b % KB
        rr = row % 128
        tile = (row // 128) * ((KB + 3) // 4) + col // 4
        tl.store(scale_ptr + tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + col % 4,
                 s_byte.to(tl.uint8), mask=bmask)
    else:
        tl.store(scale_ptr + b0 + bl, s_byte.to(tl.uint8), mask=bmask)


def amax_finite(x2d: torch.Tensor) -> torch.Tensor:
    """max |x| over finite elements of a contiguous tensor, float32 [1] on its device."""
    n = x2d.numel()
    chunk = 65536
    parts = torch.zeros(max(1, triton.cdiv(n, chunk)), dtype=torch.float32, device=x2d.device)
    if n:
        _amax_kernel[(parts.numel(),)](x2d, parts, n, CHUNK=chunk, BLOCK_N=4096)
    return parts


def device_global_scale(x2d: torch.Tensor) -> torch.Tensor:
    """`format.global_scale_from_amax(amax_finite(x))` on the device, no host sync."""
    parts = amax_finite(x2d)
    g = torch.empty(1, dtype=torch.float32, device=x2d.device)
    _global_scale_kernel[(1,)](parts, parts.numel(), g, BLOCK_N=1024)
    return g


#: launch configuration of the quantizer (bench/bench_kernels.py measures it)
BLOCK_B = 128
NUM_WARPS = 4


def quantize(x: torch.Tensor, global_scale: float | torch.Tensor | None = None,
             *, swizzled: bool = False, block_b: int = BLOCK_B, num_warps: int = NUM_WARPS) -> NVFP4Tensor:
    """NVFP4-quantize `x` along its last dim; same bytes as `quantize_ref`.

    swizzled=True writes the block scales directly in the 128x4 blocked layout
    (`format.swizzle_scales` of the reference scales; padding bytes are 0) as the
    [pad(M, 128), pad(K/16, 4)] tensor that `torch._scaled_mm` takes; the returned
    NVFP4Tensor then holds that tensor as `block_scale` (use it only for the GEMM)."""
    K = check_input(x)
    check_device(x)
    shape = x.shape
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():  # the amax kernel reads x as one flat run
        x2 = x2.contiguous()
    M = x2.shape[0]
    data = torch.empty((M, K // 2), dtype=torch.uint8, device=x.device)
    if swizzled:
        scale = torch.zeros(swizzled_scale_shape(M, K // BLOCK), dtype=torch.uint8, device=x.device)
    else:
        scale = torch.empty((M, K // BLOCK), dtype=torch.uint8, device=x.device)
    if global_scale is None:
        g_t = device_global_scale(x2)
    else:
        g_t = check_global_scale(global_scale, x.device).reshape(1)
    n_blocks = M * (K // BLOCK)
    if n_blocks:
        pairs = x2.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0
        _nvfp4_quant_kernel[(triton.cdiv(n_blocks, block_b),)](
            x2.view(torch.int32) if pairs else x2, data, scale, g_t, n_blocks, K // BLOCK,
            BF16_PAIRS=pairs, SWIZZLE=swizzled, BLOCK_B=block_b, num_warps=num_warps)
    lead = tuple(shape[:-1])
    if swizzled:
        return NVFP4Tensor(data.reshape(*lead, K // 2), scale.view(torch.float8_e4m3fn),
                           g_t.reshape(()), torch.Size(shape))
    return NVFP4Tensor(data.reshape(*lead, K // 2),
                       scale.view(torch.float8_e4m3fn).reshape(*lead, K // BLOCK),
                       g_t.reshape(()), torch.Size(shape))
