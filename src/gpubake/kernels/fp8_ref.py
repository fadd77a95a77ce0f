"""Plain-torch references for the FP8 re-expression used by the `hopper-fp8` backend.

Same definitions as the Triton kernels in `convert_triton` (see its docstring); the tests
hold the kernels to these, and the benchmark measures the error they add over NVFP4.
"""

from __future__ import annotations

import torch

from gpubake.kernels.format import BLOCK, E4M3_MAX, MIN_GLOBAL_SCALE, NVFP4Tensor, e2m1_decode, unpack_fp4


def nvfp4_to_fp8_ref(w: NVFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 weight [N, K] -> (E4M3 [N, K], float32 row scale [N])."""
    N, K = w.shape
    s = w.block_scale.float()                                   # [N, K/16], exact
    t = torch.nan_to_num(s, nan=0.0).amax(dim=1).clamp(min=2.0**-9)
    q = (E4M3_MAX / 6.0) / t
    p = (q.view(torch.int32) & 0x7F800000).view(torch.float32)  # 2**floor(log2 q)
    v = e2m1_decode(unpack_fp4(w.data)).reshape(N, K // BLOCK, BLOCK) * s.unsqueeze(-1)
    v = (v.reshape(N, K) * p.unsqueeze(1))
    v = torch.where(torch.isnan(v), v, v.clamp(-E4M3_MAX, E4M3_MAX))
    return canonical_nan_e4m3(v.to(torch.float8_e4m3fn)), w.global_scale.float() / p


def fp8_rowwise_ref(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (E4M3 [M, K], float32 scale [M, 1]), per token."""
    xf = x2d.float()
    a = xf.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), device=a.device))
    scale = torch.clamp(a.amax(dim=1, keepdim=True) / E4M3_MAX, min=MIN_GLOBAL_SCALE)
    y = xf / scale
    y = torch.where(torch.isnan(y), y, y.clamp(-E4M3_MAX, E4M3_MAX))
    return canonical_nan_e4m3(y.to(torch.float8_e4m3fn)), scale


def canonical_nan_e4m3(t: torch.Tensor) -> torch.Tensor:
    """Every E4M3 NaN as byte 0x7F (the kernels' one NaN), whatever its sign."""
    b = t.view(torch.uint8)
    return torch.where((b & 0x7F) == 0x7F, torch.full_like(b, 0x7F), b).view(torch.float8_e4m3fn)
