"""Triton kernels that re-express NVFP4 weights for GPUs without FP4 tensor cores.

* `nvfp4_to_fp8`: packed NVFP4 weight [N, K] -> E4M3 [N, K] plus one float32 scale per
  row (Hopper/Ada FP8 tensor cores, `hopper-fp8` backend). Each element
  ``e2m1 * s_block`` is exact in float32; it is multiplied by a power of two ``p[n]``
  (exact) chosen so the row's largest possible value ``6 * max(s_block)`` lands in
  (224, 448], then rounded once to E4M3 (RNE, the only error this adds: the product has
  up to 5 significant bits, E4M3 keeps 4). Row scale = global_scale / p[n].
* `nvfp4_to_bf16`: the same decode, times the global scale, to bfloat16 (`dequant-bf16`).
* `fp8_rowwise`: activations -> E4M3 with one float32 scale per token (row):
  ``scale = max(amax_finite / 448, 2**-120)``, ``q = e4m3(clamp(x / scale, +-448))``; inf
  saturates to +-448, NaN stays NaN.

Decoding is integer bit arithmetic. The final roundings (float32 -> E4M3, -> bfloat16)
use the hardware casts on the GPU (`cvt.rn`, round to nearest even: one instruction) but
integer RNE code (`_encode_e4m3`, `_encode_bf16`) under TRITON_INTERPRET=1, whose casts
round differently (seen with triton 3.x: ties away from zero, subnormals truncated). CI
holds the integer path bit-exact to torch's casts; bench/bench_kernels.py holds the GPU
path bit-exact to the same CPU references. NaN: E4M3 0x7F on both paths; bfloat16 NaN
bits are not specified (0x7FC0 interpreted, the hardware's canonical NaN on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.format import BLOCK, NVFP4Tensor
from gpubake.kernels.quantize_triton import check_device, interpreting
from gpubake.kernels.triton_rounding import round_to_dtype


@triton.jit
def _decode_e4m3(b):
    """E4M3 byte (int32) -> float32, exact, subnormals included, 0x7F/0xFF -> NaN."""
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    pow2 = ((e + 117) << 23).to(tl.float32, bitcast=True)  # 2**(e - 10), e >= 1
    v = tl.where(e == 0, m * 0.001953125, (m + 8.0) * pow2)
    v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    # sign by bits: Triton's `-v` is `0 - v`, which turns -0.0 into +0.0 on the GPU
    return (v.to(tl.uint32, bitcast=True) | ((b & 0x80).to(tl.uint32) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _decode_e2m1(c):
    """E2M1 code (int32, 0..15) -> float32 (code 8 -> -0.0), built from bits:
    0.5 is 0x3F000000; 2**(e-1) * (1 + m/2) for i = 2e + m >= 2."""
    i = c & 7
    bits = tl.where(i < 2, i * 0x3F000000, (((i >> 1) + 126) << 23) | ((i & 1) << 22))
    bits = bits | ((c & 8) << 28)
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _encode_e4m3(v):
    """float32 (|v| <= 448 or NaN) -> E4M3 byte (int32), round to nearest even."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = ((bits >> 31) << 7).to(tl.int32)
    a = tl.abs(v)
    abits = a.to(tl.uint32, bitcast=True)
    rounded = (abits + 0x7FFFF + ((abits >> 20) & 1)) & 0xFFF00000
    normal = ((((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)).to(tl.int32)
    # subnormal E4M3 (a < 2**-6): RNE(a * 2**9) to an integer 0..8, on the float32 bits:
    # a = mant24 * 2**(E - 150), so a * 2**9 = mant24 >> (141 - E), rounded half to even
    mant = ((abits & 0x7FFFFF) | 0x800000).to(tl.int32)
    shift = tl.minimum(tl.maximum(141 - (abits >> 23).to(tl.int32), 1), 30)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    sub = tl.where(shift >= 25, 0, sub)
    byte = tl.where(a >= 0.015625, normal, sub) | sign
    return tl.where(v != v, 0x7F, byte)  # one canonical NaN


@triton.jit
def _encode_bf16(v):
    """float32 -> bfloat16 bits (int32, low 16 bits), round to nearest even; NaN -> 0x7FC0."""
    bits = v.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, r.to(tl.int32))  # one canonical NaN


@triton.jit
def _nvfp4_blocks_kernel(
    data_ptr, scale_ptr, g_ptr, p_ptr, out_ptr, n_blocks, KB,
    TO_FP8: tl.constexpr, HW_CAST: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Streams the weight as consecutive 16-value blocks (8 bytes + 1 scale byte each)."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < n_blocks
    byte = tl.load(data_ptr + b[:, None] * 8 + tl.arange(0, 8)[None, :], mask=bmask[:, None], other=0)
    byte = byte.to(tl.int32)
    codes = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_B, 16))
    s = _decode_e4m3(tl.load(scale_ptr + b, mask=bmask, other=0).to(tl.int32))
    if TO_FP8:
        s = s * tl.load(p_ptr + b // KB, mask=bmask, other=1.0)
    else:
        s = s  # the global scale is applied after the exact e2m1 * s product
    v = _decode_e2m1(codes) * s[:, None]
    offs = b[:, None] * 16 + tl.arange(0, 16)[None, :]
    if TO_FP8:
        # |v| <= 6 * max_s * p <= 448 by the choice of p; NaN (NaN scale) passes through
        if HW_CAST:
            tl.store(out_ptr + offs, v.to(tl.float8e4nv), mask=bmask[:, None])
        else:
            tl.store(out_ptr + offs, _encode_e4m3(v).to(tl.uint8), mask=bmask[:, None])
    else:
        if HW_CAST:
            tl.store(out_ptr + offs, (v * tl.load(g_ptr)).to(tl.bfloat16), mask=bmask[:, None])
        else:
            tl.store(out_ptr + offs, _encode_bf16(v * tl.load(g_ptr)).to(tl.int16), mask=bmask[:, None])


@triton.jit
def _input_of(x, GELU: tl.constexpr, BF16: tl.constexpr):
    """The value the GEMM sees: `x` itself, or with `GELU` the FFN's tanh-approximate GELU of it
    rounded to the input's dtype (the down-projection's input as diffusers makes it, one pass
    fewer): 0.5 x (1 + tanh(u)) written as x / (1 + exp(-2u)), the same function (Triton has no
    portable tanh), u = sqrt(2 / pi) (x + 0.044715 x^3)."""
    if GELU:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # exp(80) keeps 1 + e finite: there x / (1 + e) is ~0, as torch's 0.5 x (1 + tanh(u)) is
        x = round_to_dtype(tl.math.div_rn(x, 1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0))), BF16)
    return x


@triton.jit
def _store_e4m3(ptrs, x, s, mask, HW_CAST: tl.constexpr):
    """x / s, saturated to +-448 (NaN stays NaN), stored as E4M3: the GPU's cast, or the bits
    by hand under the interpreter."""
    y = tl.math.div_rn(x, s)
    y = tl.where(y == y, tl.minimum(tl.maximum(y, -448.0), 448.0), y)
    if HW_CAST:
        tl.store(ptrs, y.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(ptrs, _encode_e4m3(y).to(tl.uint8), mask=mask)


@triton.jit
def _e4m3_row_scale(amax):
    """A row's E4M3 scale from its finite values' running |max| (a vector): max / 448, at
    least 2**-120 (`fp8_ref.fp8_rowwise_ref`'s)."""
    return tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), 7.52316384526264e-37)  # 2**-120


@triton.jit
def _fp8_rowwise_kernel(x_ptr, out_ptr, scale_ptr, K, stride_xm,
                        HW_CAST: tl.constexpr, BLOCK_K: tl.constexpr, GELU: tl.constexpr = False,
                        BF16: tl.constexpr = False):
    """One program per token: a pass for the row's amax, a pass to encode (the row is
    re-read from L2)."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _input_of(tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32), GELU, BF16)
        a = tl.abs(x)
        amax = tl.maximum(amax, tl.where(a < float("inf"), a, 0.0))
    s = _e4m3_row_scale(amax)
    tl.store(scale_ptr + m, s)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _input_of(tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32), GELU, BF16)
        _store_e4m3(out_ptr + m * K + cols, x, s, cols < K, HW_CAST)


def _check_weight(w: NVFP4Tensor) -> tuple[int, int]:
    if len(w.shape) != 2:
        raise KernelError(f"weight: expected a 2-D NVFP4 tensor, got shape {tuple(w.shape)}")
    N, K = w.shape
    check_device(w.data, "weight")
    return N, K


def fp8_row_factors(w: NVFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [N], row_scale [N] = global_scale / p) of `nvfp4_to_fp8`: depend on the weight
    alone, so backends compute them once at load. Same arithmetic as `fp8_ref`."""
    t = torch.nan_to_num(w.block_scale.float(), nan=0.0).amax(dim=1).clamp(min=2.0**-9)
    q = (448.0 / 6.0) / t  # t is a power of two times 1..1.875: any rounding here only
    p = (q.view(torch.int32) & 0x7F800000).view(torch.float32)  # moves p by a power of 2
    return p, w.global_scale.float() / p


def _raw(out: torch.Tensor) -> torch.Tensor:
    """Output as the kernel writes it: typed on the GPU, raw bits in the interpreter."""
    if not interpreting():
        return out
    return out.view(torch.uint8) if out.dtype == torch.float8_e4m3fn else out.view(torch.int16)


#: launch configuration (bench/bench_kernels.py measures it)
CONVERT_BLOCK_B, CONVERT_WARPS = 256, 4
ROWWISE_BLOCK_K, ROWWISE_WARPS = 1024, 4
# (A one-pass variant with the row in registers, built 2026-12-03, was half as fast on an H200
# on 2026-12-04, 0.344 against 0.177 ms at 32,760 x 5,120: the second pass re-reads its row from
# L2, so this kernel already reads HBM once; docs/benchmarks.md "Two per-forward levers".)


def _launch(w: NVFP4Tensor, out: torch.Tensor, p: torch.Tensor | None, to_fp8: bool) -> None:
    N, K = w.shape
    n_blocks = N * (K // BLOCK)
    if n_blocks:
        _nvfp4_blocks_kernel[(triton.cdiv(n_blocks, CONVERT_BLOCK_B),)](
            w.data, w.block_scale.view(torch.uint8), w.global_scale.reshape(1),
            p if p is not None else w.global_scale.reshape(1), _raw(out), n_blocks, K // BLOCK,
            TO_FP8=to_fp8, HW_CAST=not interpreting(), BLOCK_B=CONVERT_BLOCK_B, num_warps=CONVERT_WARPS)


def nvfp4_to_fp8(w: NVFP4Tensor, out: torch.Tensor | None = None,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 weight -> (E4M3 [N, K], float32 row scale [N]); `out` reused if given,
    `factors` = `fp8_row_factors(w)` if already computed."""
    N, K = _check_weight(w)
    if out is None:
        out = torch.empty((N, K), dtype=torch.float8_e4m3fn, device=w.data.device)
    p, row_scale = factors if factors is not None else fp8_row_factors(w)
    _launch(w, out, p, True)
    return out, row_scale


def nvfp4_to_bf16(w: NVFP4Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 weight -> bfloat16 [N, K] ((e2m1 * s_block) * global_scale, rounded once)."""
    N, K = _check_weight(w)
    if out is None:
        out = torch.empty((N, K), dtype=torch.bfloat16, device=w.data.device)
    _launch(w, out, None, False)
    return out


def fp8_rowwise(x2d: torch.Tensor, out: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (E4M3 [M, K], float32 scale [M, 1]), one scale per token; with
    `gelu` of F.gelu(x, approximate="tanh") instead, computed on the way (`_input_of`)."""
    check_device(x2d, "activations")
    M, K = x2d.shape
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        out = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x2d.device)
    if scale is None:
        scale = torch.empty((M, 1), dtype=torch.float32, device=x2d.device)
    if M:
        _fp8_rowwise_kernel[(M,)](x2d, _raw(out), scale, K, x2d.stride(0), HW_CAST=not interpreting(),
                                  BLOCK_K=ROWWISE_BLOCK_K, GELU=gelu, BF16=x2d.dtype == torch.bfloat16,
                                  num_warps=ROWWISE_WARPS)
    return out, scale
