"""FP8 attention through FlashAttention-3 (Hopper), for long self-attention.

FlashAttention-3 (Shah et al., 2024) is the attention kernel written for sm_90: warp-
specialized TMA loads, the softmax of one tile overlapped with the GEMMs of the next, and
an FP8 forward (E4M3 Q, K, V; V transposed in shared memory because the FP8 tensor cores
want it K-major). Its FP8 scaling is finer than cuDNN's FP8 graph:

* Q, K, V: one descale per (batch, head), so a head with small activations keeps its
  precision. K still loses its mean over tokens first (`smooth_keys`: the same softmax).
* P: the kernel computes exp2(s - rowmax + 8), so P lies in [0, 256] before its E4M3
  cast (FA3's ``Max_offset``), and the row sums are taken in fp32 from the unrounded P.
* O: accumulated in fp32, written in BF16 (no FP8 output rounding, unlike cuDNN on sm_90).

The wheel is `fa3-fwd` on PyPI (upstream FA3's forward only, built against torch's stable
C ABI, so one build loads on torch >= 2.10). `fa3_attention_reference` computes the same
quantized arithmetic in plain torch; it is the CPU tests' oracle.
"""

from __future__ import annotations

import torch

from gpubake.errors import KernelError
from gpubake.kernels.attention_common import importable, smooth_keys
from gpubake.kernels.attention_fp8 import quantized_attention
from gpubake.kernels.format import E4M3_MAX

FP8 = torch.float8_e4m3fn
FA3_MODULE = "fa3_fwd_interface"  # the fa3-fwd wheel's Python entry (registers torch.ops.fa3_fwd)
P_OFFSET = 256.0  # 2**Max_offset: FA3's FP8 softmax leaves P in [0, 256] for the E4M3 cast


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N, D] -> E4M3 codes of x * 448/amax(x[b, h]) and fp32 descales [B, H]."""
    amax = x.abs().amax(dim=(-2, -1)).float().clamp_min(1e-12)
    codes = (x * (E4M3_MAX / amax)[..., None, None]).to(FP8)
    return codes, amax / E4M3_MAX


def fa3_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                            smooth: bool = True) -> torch.Tensor:
    """The FP8 arithmetic of `fa3_fp8_attention` in plain torch ([B, H, N, D], q's dtype).

    Q, K, V go through E4M3 with per-head scales and P through E4M3 with FA3's offset;
    products and sums are fp32, as on the tensor cores. The kernel's online softmax rescales
    P per key tile against a running max, so the two agree to E4M3 rounding of P, not bit
    for bit (within a tile both round the same values)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if smooth:
        k = smooth_keys(k)
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_head(x) for x in (q, k, v))
    out = quantized_attention(q8, dq[..., None, None], k8, dk[..., None, None], v8, dv[..., None, None],
                              scale, p_scale=P_OFFSET, fp8_out=False)
    return out.to(q.dtype)


def fa3_available() -> bool:
    """The fa3-fwd wheel imports (its kernels are sm_90 only: the caller checks the GPU)."""
    return importable(FA3_MODULE)


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head FP8 attention on FA3 ([B, H, N, D] CUDA bf16/fp16 in, q's dtype out).

    The amax reductions, smoothing and casts are plain torch (fused by inductor inside a
    compiled block); the kernel is the wheel's own custom op (`fa3_forward`), opaque to
    torch.compile."""
    # checked eagerly only: an import is untraceable, and set_self_attention_kernel has
    # already imported the wheel (registering torch.ops.fa3_fwd) before any compile
    if not torch.compiler.is_compiling() and not fa3_available():
        raise KernelError("fa3-fp8 attention: the fa3-fwd wheel is not installed (pip install 'gpubake[gpu]')")
    q8, dq = quantize_per_head(q)
    k8, dk = quantize_per_head(smooth_keys(k))
    v8, dv = quantize_per_head(v)
    return fa3_forward(q8, k8, v8, scale, dq, dk, dv).to(q.dtype)


def fa3_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_descale: torch.Tensor | None = None,
                k_descale: torch.Tensor | None = None, v_descale: torch.Tensor | None = None) -> torch.Tensor:
    """The wheel's op on [B, H, N, D] views of [B, N, H, D] memory (BF16, or E4M3 with [B, H]
    descales); its output seen as [B, H, N, D] again. The transposes are free views."""
    out = torch.ops.fa3_fwd._flash_attn_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, softmax_scale=scale)[0]
    return out.transpose(1, 2)
