"""8-bit attention for the long self-attention of video DiTs (issue 7).

Three kernels behind one dispatch (`lowp_attention`, `set_self_attention_kernel`):
SageAttention-1 here, cuDNN's FP8 SDPA (`attention_fp8`) and FlashAttention-3's FP8
forward (`attention_fa3`, the Hopper plan's choice); each with a torch reference.

At 480x832x81 a Wan block's self-attention over 32760 tokens is ~45 % of a BF16 step and
~60 % once the linears are NVFP4, so the GEMM kernels alone cannot reach the step goal.
SageAttention (Zhang et al., 2024; the `sageattention` 1.x wheel on PyPI, pure Triton)
quantizes Q and K to INT8 per block of tokens after subtracting K's mean over tokens
("smoothing": softmax is invariant to it, and it removes the channel outliers that make
per-block INT8 lossy), does QK^T on the INT8 tensor cores and P·V in FP16.

Two ways to run it, same math:

* `sage_reference`: plain torch, readable, runs anywhere (the CPU tests' oracle).
* `sage_int8` (the ``gpubake::sage_int8_attention`` custom op): the library's Triton
  kernels, opaque to torch.compile so a compiled block calls it as one node.

`set_self_attention_int8(model)` points the self-attention processors of a diffusers
DiT at diffusers' attention backend for exactly this algorithm
(``_sage_qk_int8_pv_fp16_triton``). Its stock entry calls the CUDA-built SageAttention
>= 2.1.1, for which no wheel exists for torch 2.11; where that is missing we register the
1.x wheel's kernels under the same name (a private diffusers registry, pinned by
diffusers==0.42.1 and by a test). A torch function mode over SDPA would need no diffusers
internals, but under torch.compile it graph-breaks on every `Tensor.unflatten` in the
block (seen with torch 2.13), undoing the regional compile.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from gpubake.errors import KernelError
from gpubake.kernels import attention_fa3, attention_fp8
from gpubake.kernels.attention_common import importable, smooth_keys

LOG2E = 1.44269504  # the library folds log2(e) into Q's scale and uses exp2
BLOCK_Q, BLOCK_K = 128, 64  # the library's quantization blocks (tokens)
HEAD_DIMS = (64, 128)
MIN_TOKENS = 1024  # shorter attentions (text cross-attention) stay on torch SDPA


def _quant_per_block(x: torch.Tensor, block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] * scale -> int8 codes and one fp32 scale per `block` tokens per head.

    Round half away from zero, as the library's kernel does (x/s + 0.5*sign, truncate)."""
    b, h, n, d = x.shape
    pad = (-n) % block
    xf = F.pad(x.float() * scale, (0, 0, 0, pad)).reshape(b, h, (n + pad) // block, block, d)
    s = xf.abs().amax(dim=(-2, -1), keepdim=True) / 127.0
    q = xf / s
    q = torch.trunc(q + 0.5 * torch.where(q >= 0, 1.0, -1.0)).to(torch.int8)
    return q.reshape(b, h, n + pad, d)[:, :, :n], s.reshape(b, h, -1)


def sage_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   smooth_k: bool = True) -> torch.Tensor:
    """SageAttention-1 in plain torch, layout [B, H, N, D] like SDPA; returns q's dtype.

    The INT8 products are exact (int32 sums fit), the softmax is fp32 in base 2, and P and V
    are rounded to fp16 before their product, as in the kernel. The kernel's online softmax
    accumulates P·V in fp16 per 64-key tile; here the sum is fp32, so the two agree to fp16
    rounding of the partial sums, not bit for bit."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if smooth_k:
        k = smooth_keys(k)
    q8, qs = _quant_per_block(q, BLOCK_Q, scale * LOG2E)
    k8, ks = _quant_per_block(k, BLOCK_K, 1.0)
    logits = torch.matmul(q8.double(), k8.double().transpose(-1, -2)).float()  # exact integers
    logits = logits * qs.repeat_interleave(BLOCK_Q, -1)[..., : q.shape[-2], None]
    logits = logits * ks.repeat_interleave(BLOCK_K, -1)[..., None, : k.shape[-2]]
    p = torch.exp2(logits - logits.amax(dim=-1, keepdim=True))
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p.half().float(), v.half().float()) / denom
    return out.to(q.dtype)


def _sage_library_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The library's quantizer + attention kernels on HND tensors (no input mutated).

    Calls its two Triton kernels directly instead of `sageattn`, which subtracts K's mean
    IN PLACE (`k -= km`) and would silently change the caller's tensor."""
    from sageattention.attn_qk_int8_per_block import forward as attn
    from sageattention.quant_per_block import per_block_int8

    k = smooth_keys(k)
    q8, qs, k8, ks = per_block_int8(q, k, BLKQ=BLOCK_Q, BLKK=BLOCK_K, sm_scale=scale, tensor_layout="HND")
    return attn(q8, k8, v.to(torch.float16), qs, ks, tensor_layout="HND", output_dtype=q.dtype)


@torch.library.custom_op("gpubake::sage_int8_attention", mutates_args=())
def sage_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SageAttention-1 through the library's Triton kernels ([B, H, N, D], CUDA)."""
    return _sage_library_call(q, k, v, scale)


@sage_int8.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def sage_available() -> bool:
    """The `sageattention` 1.x wheel (Triton kernels) can be imported."""
    return importable("sageattention")


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, min_tokens: int = MIN_TOKENS) -> bool:
    """Whether [B, H, N, D] q/k/v are a long attention the 8-bit kernel computes."""
    return (
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4
        and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
        and q.shape[-1] in HEAD_DIMS and k.shape[-1] == q.shape[-1] and v.shape[-1] == q.shape[-1]
        and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[-2] == v.shape[-2]
        and q.shape[-2] >= min_tokens and k.shape[-2] >= min_tokens
        and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    )


LOWP_KERNELS = ("sage-int8", "cudnn-fp8", "fa3-fp8")


def lowp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   kernel: str = "sage-int8", min_tokens: int = MIN_TOKENS) -> torch.Tensor:
    """8-bit attention `kernel` where it applies, torch SDPA where it does not ([B, H, N, D]).

    On CUDA the fast kernel (the sageattention wheel's Triton kernels, or cuDNN's FP8 SDPA);
    elsewhere its torch reference (the same quantized math, slowly), so a CPU test runs the
    path the GPU runs."""
    if kernel not in LOWP_KERNELS:
        raise KernelError(f"8-bit attention: kernel {kernel!r} (one of {', '.join(LOWP_KERNELS)})")
    if not eligible(q, k, v, min_tokens) or (kernel == "sage-int8" and k.shape[-2] % BLOCK_K):
        # sageattention 1.0.6 leaves its last key tile unmasked: with N % 64 != 0 the padding
        # keys enter the softmax (tests/kernels/test_attention.py), so such calls stay on SDPA
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if kernel == "cudnn-fp8":
        from gpubake.kernels.attention_fp8 import cudnn_fp8_attention, fp8_attention_reference

        return cudnn_fp8_attention(q, k, v, scale) if q.is_cuda else fp8_attention_reference(q, k, v, scale)
    if kernel == "fa3-fp8":
        from gpubake.kernels.attention_fa3 import fa3_attention_reference, fa3_fp8_attention

        return fa3_fp8_attention(q, k, v, scale) if q.is_cuda else fa3_attention_reference(q, k, v, scale)
    if q.is_cuda:
        if not sage_available():
            raise KernelError("int8 attention: the sageattention wheel is not installed (pip install 'gpubake[triton]')")
        return sage_int8(q, k, v, scale)
    return sage_reference(q, k, v, scale)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   min_tokens: int = MIN_TOKENS) -> torch.Tensor:
    """SageAttention-1 where it applies (`lowp_attention` with kernel "sage-int8")."""
    return lowp_attention(q, k, v, scale, "sage-int8", min_tokens)


# The diffusers attention-backend slot each kernel fills (diffusers==0.42.1 names): for
# sage-int8 the slot of exactly this algorithm (INT8 QK, FP16 PV, Triton), whose stock
# entry needs SageAttention >= 2.1.1; for cudnn-fp8 the slot of cuDNN attention, whose
# stock entry runs cuDNN in BF16 (ours falls back to torch SDPA, i.e. cuDNN on Hopper,
# for every call it does not take); for fa3-fp8 the slot of FlashAttention-3, whose stock
# entry needs FA3's `flash_attn_interface` module (BF16). Our functions are registered
# only while in use.
DIFFUSERS_SLOTS = {"sage-int8": "_sage_qk_int8_pv_fp16_triton", "cudnn-fp8": "_native_cudnn", "fa3-fp8": "_flash_3"}
DIFFUSERS_BACKEND = DIFFUSERS_SLOTS["sage-int8"]


def _backend_fn(kernel: str):
    def fn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False, scale: float | None = None, return_lse: bool = False,
           _parallel_config=None) -> torch.Tensor:
        """diffusers' attention-backend signature: [B, N, H, D] in and out."""
        if attn_mask is not None or is_causal or return_lse or _parallel_config is not None:
            raise KernelError(f"{kernel} attention: no mask, causal, LSE or context parallelism (self-attention only)")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return lowp_attention(q, k, v, scale, kernel).transpose(1, 2)

    fn.__name__ = f"gpubake_{kernel.replace('-', '_')}_attention"
    return fn


_BACKEND_FNS = {k: _backend_fn(k) for k in LOWP_KERNELS}
_diffusers_backend_fn = _BACKEND_FNS["sage-int8"]


class _Parts(NamedTuple):
    """Where a kernel's functions live, looked up by name on use (so a test may replace one)."""

    module: ModuleType
    available: str  # () -> bool: its wheel imports
    reference: str  # (q, k, v, scale) -> out: its torch reference


# lowp_attention keeps plain imports instead: dynamo traces those inside a compiled block
_PARTS = {
    "sage-int8": _Parts(sys.modules[__name__], "sage_available", "sage_reference"),
    "cudnn-fp8": _Parts(attention_fp8, "cudnn_frontend_available", "fp8_attention_reference"),
    "fa3-fp8": _Parts(attention_fa3, "fa3_available", "fa3_attention_reference"),
}


def _part(kernel: str, field: str):
    if kernel not in _PARTS:
        raise KernelError(f"8-bit attention: kernel {kernel!r} (one of {', '.join(LOWP_KERNELS)})")
    parts = _PARTS[kernel]
    return getattr(parts.module, getattr(parts, field))


def kernel_available(kernel: str) -> bool:
    """Whether the wheel behind 8-bit attention `kernel` imports here (CPU runs the reference).
    Importing FA3's registers torch.ops.fa3_fwd before any compile traces a call."""
    return _part(kernel, "available")()


def reference_of(kernel: str):
    """The torch reference of 8-bit attention `kernel`: same quantized arithmetic, any device."""
    return _part(kernel, "reference")


def _register_diffusers_backend(kernel: str) -> object:
    """Our function for `kernel` in its diffusers slot (sage: unless diffusers runs Sage 2 itself)."""
    from diffusers.models import attention_dispatch as ad

    kernel_available(kernel)  # imports the wheel now: FA3's op must be registered before a compile

    name = ad.AttentionBackendName(DIFFUSERS_SLOTS[kernel])
    if kernel == "sage-int8" and getattr(ad, "_CAN_USE_SAGE_ATTN", False):
        return name  # a real SageAttention 2 install: diffusers' own entry is the better kernel
    fn = _BACKEND_FNS[kernel]
    if ad._AttentionBackendRegistry._backends.get(name) is not fn:
        ad._AttentionBackendRegistry.register(name)(fn)
    return name


def set_self_attention_kernel(model: torch.nn.Module, kernel: str | None) -> int:
    """Route the self-attention (`attn1`) of every block of a diffusers DiT through the
    8-bit `kernel` (None: back to torch SDPA); returns how many attention modules changed.

    Cross-attention over the 512 text tokens stays on SDPA: it is <2 % of the step."""
    if kernel is not None and kernel not in LOWP_KERNELS:
        raise KernelError(f"8-bit attention: kernel {kernel!r} (one of {', '.join(LOWP_KERNELS)})")
    return route_self_attention(model, _register_diffusers_backend(kernel) if kernel else None)


def route_self_attention(model: torch.nn.Module, backend: Any) -> int:
    """Set diffusers' attention backend of every block's self-attention (`attn1`) processor
    to `backend` (None: the default dispatch); returns how many modules changed."""
    n = 0
    for mod_name, mod in model.named_modules():
        proc = getattr(mod, "processor", None)
        if mod_name.endswith("attn1") and proc is not None and hasattr(proc, "_attention_backend"):
            proc._attention_backend = backend
            n += 1
    return n


def set_self_attention_int8(model: torch.nn.Module, enabled: bool = True) -> int:
    """`set_self_attention_kernel` with SageAttention-1 (or back to SDPA)."""
    return set_self_attention_kernel(model, "sage-int8" if enabled else None)
