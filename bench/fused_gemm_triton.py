"""Fused Triton W4A8 GEMM for Hopper/Ada: NVFP4 weight decoded to FP8 inside the GEMM.

Bench-only (bench/bench_kernels.py measures it; no backend selects it, docs/kernels.md).

The `hopper-fp8` backend's other variant (the default) re-expresses the whole weight into
an FP8 scratch buffer and calls cuBLAS. This kernel never materialises the FP8 weight: each
program loads packed nibbles and E4M3 block scales for its [BLOCK_N, BLOCK_K] tile, builds
the same E4M3 values as `convert_triton.nvfp4_to_fp8` (e2m1 * s_block * p[n], one RNE
rounding by the hardware cast), and feeds them to the FP8 tensor cores with the per-token
FP8 activations. It reads 4.5 bits per weight instead of 8 + the scratch round trip, but
decodes every weight tile once per M tile, so it can only win when M is small
(docs/benchmarks.md has the measurement).

Needs a CUDA GPU with FP8 tensor cores (sm_89+): Triton's interpreter has no FP8 dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.convert_triton import _decode_e2m1, _decode_e4m3
from gpubake.kernels.format import NVFP4Tensor


@triton.jit
def _w4a8_kernel(
    a_ptr, a_scale_ptr, w_ptr, ws_ptr, p_ptr, row_scale_ptr, bias_ptr, c_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mmask = offs_m < M
    nmask = offs_n < N
    p = tl.load(p_ptr + offs_n, mask=nmask, other=1.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KH = K // 2
    KB = K // 16
    for k0 in range(0, K, BLOCK_K):
        ka = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * K + ka[None, :], mask=mmask[:, None], other=0.0)
        kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + offs_n[:, None] * KH + kh[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K))
        kb = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        sb = tl.load(ws_ptr + offs_n[:, None] * KB + kb[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        f = _decode_e4m3(sb) * p[:, None]
        v = tl.reshape(_decode_e2m1(codes), (BLOCK_N, BLOCK_K // 16, 16)) * f[:, :, None]
        b = tl.reshape(v, (BLOCK_N, BLOCK_K)).to(tl.float8e4nv)
        acc = tl.dot(a, tl.trans(b), acc)
    sa = tl.load(a_scale_ptr + offs_m, mask=mmask, other=0.0)
    sw = tl.load(row_scale_ptr + offs_n, mask=nmask, other=0.0)
    acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def w4a8_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, w: NVFP4Tensor,
              factors: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, *, block_m: int = 128, block_n: int = 128,
              block_k: int = 128, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """y[M, N] = (a_fp8 * a_scale) @ fp8(W).T * row_scale + bias, W decoded in-kernel;
    `factors` = `convert_triton.fp8_row_factors(w)`."""
    M, K = a_fp8.shape
    N = w.shape[0]
    if K % block_k or a_fp8.device.type != "cuda":
        raise KernelError(f"w4a8_gemm: needs CUDA tensors and K % {block_k} == 0, got K={K} on {a_fp8.device}")
    p, row_scale = factors
    c = torch.empty((M, N), dtype=out_dtype, device=a_fp8.device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _w4a8_kernel[grid](a_fp8, a_scale, w.data, w.block_scale.view(torch.uint8), p, row_scale,
                       bias if bias is not None else c, c, M, N, K, HAS_BIAS=bias is not None,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                       num_warps=num_warps, num_stages=num_stages)
    return c
