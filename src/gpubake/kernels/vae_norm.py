"""The Wan VAE's RMS norm and the SiLU after it, as one Triton pass, beside its torch reference.

diffusers' ``WanRMS_norm`` (channels first) runs as five to seven passes over a 5-D tensor: the
input to float32, its norm over the channels, the division, the cast back, the two products
with the scale and gamma; the residual block's SiLU is one more. At the decoder's full
resolution such a tensor is 0.3 GB, and an H200's eager 480p decode spends ~1.0 s of its 1.83
s outside the convolutions, mostly there (bench/bench_vae_decode.py --profile). One program
here reads a [channels x voxels] tile twice (the sum of squares, then the output; the second
read mostly from L2) and writes the activated output once.

`rms_norm_silu_reference` is the definition (diffusers' arithmetic: the normalised value
rounded to the input's dtype, then each product rounded, then SiLU). The kernel follows the
same rounding steps with IEEE division and square root (`div_rn`, `sqrt_rn`); what it cannot
reproduce bit for bit is the order of the sum of squares and the float32 exp of the SiLU (the
GPU's fast exp, a few float32 ulps), so the two may differ in the last place of the output's dtype on a few values: a normalised
value one bf16 ulp off can be two after the scale, gamma and SiLU roundings (tested: at most
two bf16 ulps, on under 0.1 % of the values; measured under 0.005 %).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.quantize_triton import check_device
from gpubake.kernels.triton_rounding import round_to_dtype

EPS = 1e-12  # F.normalize's default
BLOCK_C = 32  # channels a sweep step loads (divides the Wan VAE's 96, 192 and 384)
BLOCK_V = 128  # voxels a program owns: 256 contiguous bytes of bf16 per channel row of NCDHW


def rms_norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = True) -> torch.Tensor:
    """diffusers' ``WanRMS_norm.forward`` (channel_first, no bias) and, if `silu`, F.silu."""
    normalized = torch.nn.functional.normalize(x.float(), dim=1, eps=EPS).to(x.dtype)
    y = normalized * scale * gamma
    return torch.nn.functional.silu(y) if silu else y


@triton.jit
def _rms_norm_silu_kernel(x_ptr, g_ptr, y_ptr, C, V, sxb, sxc, sxv, syb, syc, syv, scale,
                          EPS_: tl.constexpr, SILU: tl.constexpr, BF16: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    """One program: BLOCK_V voxels, all C channels in chunks of BLOCK_C; the sum of squares in
    a first sweep, the normalised and activated values in a second (the tile's second read
    mostly hits L2). The wide voxel axis keeps an NCDHW tensor's loads coalesced."""
    pv = tl.program_id(0).to(tl.int64)  # the voxel tiles on the grid's x axis: up to 2**31 - 1 of them
    b = tl.program_id(1).to(tl.int64)
    v = pv * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    vmask = v < V
    ss = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[:, None]
        x = tl.load(x_ptr + b * sxb + c * sxc + v * sxv, mask=(c < C) & vmask, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=0)
    denom = tl.maximum(tl.sqrt_rn(ss), EPS_)[None, :]
    out_ty = y_ptr.dtype.element_ty
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[:, None]
        mask = (c < C) & vmask
        x = tl.load(x_ptr + b * sxb + c * sxc + v * sxv, mask=mask, other=0.0).to(tl.float32)
        n = round_to_dtype(tl.math.div_rn(x, denom), BF16)
        n = round_to_dtype(n * scale, BF16)
        g = tl.load(g_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = round_to_dtype(n * g, BF16)
        if SILU:
            y = round_to_dtype(tl.math.div_rn(y, 1.0 + tl.exp(-y)), BF16)
        tl.store(y_ptr + b * syb + c * syc + v * syv, y.to(out_ty), mask=mask)


def voxel_stride(x: torch.Tensor) -> int | None:
    """The one stride of `x`'s spatial dims [B, C, *S] read as a single axis, or None when they
    do not collapse (contiguous NCDHW: 1; channels_last_3d, or a channel slice of it: the
    allocated channel count)."""
    sizes, strides = x.shape[2:], x.stride()[2:]
    step = strides[-1] if sizes else 1
    expect = step
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expect:
            return None
        expect *= size
    return step


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = True) -> torch.Tensor:
    """`rms_norm_silu_reference` in one pass: `x` [B, C, ...] (CUDA, or the CPU under
    TRITON_INTERPRET=1) in bf16 or fp32, `gamma` C values; the output contiguous."""
    check_device(x)
    if x.ndim < 3 or x.dtype not in (torch.bfloat16, torch.float32):
        raise KernelError(f"rms_norm_silu: need [B, C, ...] bf16 or fp32, got {x.dtype} {list(x.shape)}")
    if gamma.numel() != x.shape[1]:
        raise KernelError(f"rms_norm_silu: gamma has {gamma.numel()} values for {x.shape[1]} channels")
    sv = voxel_stride(x)
    if sv is None:
        x, sv = x.contiguous(), 1
    B, C = x.shape[:2]
    V = x[0, 0].numel()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_v = max(16, min(BLOCK_V, triton.next_power_of_2(V)))
    grid = (triton.cdiv(V, block_v), B)  # a 720p frame batch is > 65,535 tiles: not the y axis
    g = gamma.reshape(-1).to(device=x.device).contiguous()
    _rms_norm_silu_kernel[grid](x, g, y, C, V, x.stride(0), x.stride(1), sv, y.stride(0), y.stride(1), 1,
                                float(scale), EPS_=EPS, SILU=silu, BF16=x.dtype == torch.bfloat16, BLOCK_C=BLOCK_C, BLOCK_V=block_v, num_warps=4)
    return y
