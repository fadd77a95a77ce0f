"""A Wan block's LayerNorm (and its modulation) with the FP8 activation quantization of the
linears it feeds, as one Triton pass, beside its reference (issue 18; built, not yet measured
on a GPU, not yet used by the block).

In diffusers' ``WanTransformerBlock`` each of the three norms writes a bf16 tensor that only
linears read: ``norm1`` (modulated) feeds Q, K and V, ``norm2`` (affine) the cross-attention's
Q, ``norm3`` (modulated) the FFN's up-projection; on ``hopper-fp8`` each of those linears then
reads it again to quantize it per token to E4M3 (`convert_triton.fp8_rowwise`, 2 bytes read and
1 written a value each). At 480p on an H200 that is 168 M values a norm: the norm's bf16 write
and its consumers' reads are ~10 bytes a value for the self-attention's input (three
consumers) and ~4 for the other two, ~1 ms a block at ~3 TB/s (~3.5 % of a 28 ms block, from
the 2026-12-03 profile). One pass that normalises, modulates, rounds to the hidden states'
dtype as diffusers does and quantizes writes only the E4M3 codes and a scale a row.

`layer_norm_fp8_reference` is the definition: diffusers' arithmetic
(``FP32LayerNorm(x.float())``, then ``* (1 + scale) + shift`` in float32, ``.type_as(x)``),
then `fp8_ref.fp8_rowwise_ref`. The kernel computes the mean and variance in two sweeps
(torch: Welford, in another order), so the normalised value can be an ulp off in float32;
after the rounding to bf16 and to E4M3 the codes are the reference's on nearly every value and
the next code on the rest (tests/kernels/test_norm_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.convert_triton import _e4m3_row_scale, _raw, _store_e4m3
from gpubake.kernels.fp8_ref import fp8_rowwise_ref
from gpubake.kernels.quantize_triton import check_device, interpreting
from gpubake.kernels.triton_rounding import round_to_dtype

BLOCK_K = 1024  # channels a sweep step loads (5,120 = 5 steps)


def layer_norm_fp8_reference(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                             shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, K] hidden states -> (E4M3 [B*S, K], float32 [B*S, 1]): the FP8 per-token
    quantization of ``(layer_norm(x.float(), weight, bias) * (1 + scale) + shift).type_as(x)``
    (no modulation where `scale` is None), as diffusers' Wan block and `hopper-fp8` compute it."""
    k = x.shape[-1]
    y = torch.nn.functional.layer_norm(x.float(), (k,), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale) + shift
    return fp8_rowwise_ref(y.type_as(x).reshape(-1, k))


@triton.jit
def _normalised(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, row, batch, cols, K, stride_x, stride_mod, mean, rstd,
                AFFINE: tl.constexpr, MODULATE: tl.constexpr, BF16: tl.constexpr):
    """One sweep step's values as the reference rounds them: (x - mean) * rstd, the affine
    weight and bias, the modulation, each op rounded to float32, then to the output dtype."""
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd
    if AFFINE:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0) + tl.load(b_ptr + cols, mask=mask, other=0.0)
    if MODULATE:
        one_plus = 1.0 + tl.load(sc_ptr + batch * stride_mod + cols, mask=mask, other=0.0)
        y = y * one_plus + tl.load(sh_ptr + batch * stride_mod + cols, mask=mask, other=0.0)
    return round_to_dtype(y, BF16)


@triton.jit
def _layer_norm_fp8_kernel(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, out_ptr, scale_ptr, K, S, stride_x, stride_mod,
                           EPS: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr, BF16: tl.constexpr,
                           HW_CAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token: sweeps for the mean, the variance, the amax of the normalised
    values and their codes (every sweep after the first reads the row from L2)."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // S
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        acc += tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    kf = K.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(acc, axis=0), kf)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32) - mean
        acc += tl.where(cols < K, d * d, 0.0)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(acc, axis=0), kf) + EPS))
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = tl.abs(_normalised(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, row, batch, cols, K, stride_x, stride_mod,
                               mean, rstd, AFFINE, MODULATE, BF16))
        amax = tl.maximum(amax, tl.where((a < float("inf")) & (cols < K), a, 0.0))
    s = _e4m3_row_scale(amax)
    tl.store(scale_ptr + row, s)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        y = _normalised(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, row, batch, cols, K, stride_x, stride_mod,
                        mean, rstd, AFFINE, MODULATE, BF16)
        _store_e4m3(out_ptr + row * K + cols, y, s, cols < K, HW_CAST)


def _modulation(t: torch.Tensor | None, batch: int, k: int, what: str) -> torch.Tensor | None:
    """diffusers' shift / scale chunk ([B, 1, K] float32, a view of the block's table) as
    [B, K] rows of unit stride."""
    if t is None:
        return None
    if t.dtype != torch.float32 or t.numel() != batch * k or t.shape[-1] != k:
        raise KernelError(f"layer_norm_fp8: {what} must be float32 [{batch}, 1, {k}], got {t.dtype} {list(t.shape)}")
    t = t.reshape(batch, k)
    return t if t.stride(1) == 1 else t.contiguous()


def layer_norm_fp8(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   block_k: int = BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_norm_fp8_reference` in one launch ([B, S, K] bf16 or float32 hidden states,
    CUDA, or the CPU under TRITON_INTERPRET=1): weight and bias together or neither, scale
    and shift together or neither."""
    check_device(x, "hidden states")
    if x.ndim != 3 or x.dtype not in (torch.bfloat16, torch.float32):
        raise KernelError(f"layer_norm_fp8: hidden states must be bf16 or float32 [B, S, K], got {x.dtype} {list(x.shape)}")
    if (weight is None) != (bias is None) or (scale is None) != (shift is None):
        raise KernelError("layer_norm_fp8: weight and bias come together, and so do scale and shift")
    batch, tokens, k = x.shape
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (k,):
            raise KernelError(f"layer_norm_fp8: {name} must be [{k}], got {list(p.shape)}")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    w, b = (None if p is None else p.detach().to(device=x.device, dtype=torch.float32).contiguous()
            for p in (weight, bias))
    sc, sh = _modulation(scale, batch, k, "scale"), _modulation(shift, batch, k, "shift")
    out = torch.empty((rows.shape[0], k), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        dummy = row_scale  # an unread pointer where a table is absent
        _layer_norm_fp8_kernel[(rows.shape[0],)](
            rows, dummy if w is None else w, dummy if b is None else b, dummy if sc is None else sc,
            dummy if sh is None else sh, _raw(out), row_scale, k, tokens, rows.stride(0),
            0 if sc is None else sc.stride(0), EPS=float(eps), AFFINE=w is not None, MODULATE=sc is not None,
            BF16=x.dtype == torch.bfloat16, HW_CAST=not interpreting(), BLOCK_K=block_k, num_warps=4,
            enable_fp_fusion=False)
    return out, row_scale
