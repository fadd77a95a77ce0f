"""The self-attention's Q/K RMS norm and rotary embedding as one Triton pass, beside its reference.

diffusers' Wan processor normalises Q and K over all heads (``norm_q``, ``norm_k``: RMSNorm
over 5,120 channels), then rotates each head's channel pairs (``apply_rotary_emb``: the pairs
unbound, four products, written back through strided slices). Compiled, inductor makes that
one reduction kernel for both, which a profile of the 720p forward measured at 3.28 ms a
block (`bench/profile_forward.py`): five times what reading and writing Q and K once costs on
an H200, and 4 % of the block, while the cross-attention's plain RMS norm of one such tensor
runs at 0.42 ms. One program here owns `block_r` tokens of Q or of K: a first sweep over the
heads sums the squares, a second (from L2) normalises, scales, rotates and writes each head.

`qk_norm_rope_reference` is the definition: diffusers' own arithmetic (torch's ``rms_norm``,
x * rstd * weight in float32 rounded once to the input's dtype; then the rotation's products
in float32 from those rounded values, each rounded to float32, rounded once more to the
dtype). The kernel takes the same rounding steps with IEEE division and square root and no
fused multiply-adds; only the order of the sum of squares differs, so an output may be one
bf16 ulp off on a few values (tested: at most one, on under 0.5 % of the values).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.quantize_triton import check_device
from gpubake.kernels.triton_rounding import round_to_dtype

BLOCK_R = 8  # tokens a program owns (bench/bench_qk_norm_rope.py sweeps it)


def apply_rotary_reference(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan ``apply_rotary_emb`` (transformer_wan.WanAttnProcessor), unchanged."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def qk_norm_rope_reference(query: torch.Tensor, key: torch.Tensor, norm_q: torch.nn.Module, norm_k: torch.nn.Module,
                           freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' processor does between the projections and the attention: [B, S, H*D]
    Q and K -> [B, S, H, D], normalised and rotated."""
    q = norm_q(query).unflatten(2, (heads, -1))
    k = norm_k(key).unflatten(2, (heads, -1))
    return apply_rotary_reference(q, freqs_cos, freqs_sin), apply_rotary_reference(k, freqs_cos, freqs_sin)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, oq_ptr, ok_ptr, cos_ptr, sin_ptr, R, S,
                         sq, sk, so, sc, ss_, EPS: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, BF16: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """Program (i, 0) normalises and rotates tokens [i*BLOCK_R, (i+1)*BLOCK_R) of Q, (i, 1) of K."""
    pid = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        x_ptr, w_ptr, o_ptr, sx = q_ptr, wq_ptr, oq_ptr, sq
    else:
        x_ptr, w_ptr, o_ptr, sx = k_ptr, wk_ptr, ok_ptr, sk
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, HD)
    x_rows = x_ptr + rows[:, None] * sx + cols[None, :]
    sumsq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h in range(H):
        x = tl.load(x_rows + h * HD, mask=rmask[:, None], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sumsq, H * HD) + EPS))[:, None]
    tok = (rows % S)[:, None]
    half = tl.arange(0, HD // 2)[None, :]
    cos = tl.load(cos_ptr + tok * sc + 2 * half, mask=rmask[:, None], other=0.0)  # freqs_cos[..., 0::2]
    sin = tl.load(sin_ptr + tok * ss_ + 2 * half + 1, mask=rmask[:, None], other=0.0)  # freqs_sin[..., 1::2]
    out_ty = o_ptr.dtype.element_ty
    for h in range(H):
        x = tl.load(x_rows + h * HD, mask=rmask[:, None], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + h * HD + cols)[None, :]
        y = round_to_dtype(x * rstd * w, BF16)
        y1, y2 = tl.split(tl.reshape(y, (BLOCK_R, HD // 2, 2)))
        even = round_to_dtype(y1 * cos - y2 * sin, BF16)
        odd = round_to_dtype(y1 * sin + y2 * cos, BF16)
        out = tl.reshape(tl.join(even, odd), (BLOCK_R, HD))
        tl.store(o_ptr + rows[:, None] * so + h * HD + cols[None, :], out.to(out_ty), mask=rmask[:, None])


def _rows(x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """[B, S, dim] as [B*S, dim] rows with unit column stride (a view where one exists: a
    fused projection's chunk keeps its row stride)."""
    if x.ndim != 3 or x.shape[-1] != dim:
        raise KernelError(f"qk_norm_rope: {what} must be [B, S, {dim}], got {list(x.shape)}")
    rows = x.reshape(-1, dim)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _freqs(f: torch.Tensor, tokens: int, head_dim: int, what: str) -> torch.Tensor:
    if f.numel() != tokens * head_dim:
        raise KernelError(f"qk_norm_rope: {what} has {f.numel()} values for {tokens} tokens x {head_dim}")
    f = f.reshape(tokens, head_dim)
    return f if f.stride(1) == 1 else f.contiguous()


def qk_norm_rope(query: torch.Tensor, key: torch.Tensor, norm_q: torch.nn.Module, norm_k: torch.nn.Module,
                 freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, heads: int,
                 block_r: int = BLOCK_R) -> tuple[torch.Tensor, torch.Tensor]:
    """`qk_norm_rope_reference` in one launch: Q and K [B, S, H*D] (bf16 or fp32, CUDA, or the
    CPU under TRITON_INTERPRET=1), the norms torch RMSNorms over H*D with weights, the
    rotary tables [1, S, 1, D] float32 (diffusers' ``WanRotaryPosEmbed``); -> [B, S, H, D] each."""
    check_device(query, "query")
    dim = query.shape[-1]
    if heads <= 0 or dim % heads or (dim // heads) % 2 or (dim // heads) & (dim // heads - 1):
        raise KernelError(f"qk_norm_rope: {dim} channels in {heads} heads: need an even power-of-two head size")
    if key.shape != query.shape or key.dtype != query.dtype or query.dtype not in (torch.bfloat16, torch.float32):
        raise KernelError(f"qk_norm_rope: query {query.dtype} {list(query.shape)}, key {key.dtype} {list(key.shape)}: "
                          "need the same shape and dtype, bf16 or fp32")
    for name, norm in (("norm_q", norm_q), ("norm_k", norm_k)):
        if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None or tuple(norm.normalized_shape) != (dim,):
            raise KernelError(f"qk_norm_rope: {name} must be an RMSNorm over {dim} channels with a weight")
    if norm_q.eps != norm_k.eps:
        raise KernelError(f"qk_norm_rope: norm_q eps {norm_q.eps} and norm_k eps {norm_k.eps} differ")
    head_dim, (batch, tokens) = dim // heads, query.shape[:2]
    q, k = _rows(query, dim, "query"), _rows(key, dim, "key")
    cos, sin = _freqs(freqs_cos, tokens, head_dim, "freqs_cos"), _freqs(freqs_sin, tokens, head_dim, "freqs_sin")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise KernelError(f"qk_norm_rope: rotary tables must be float32, got {cos.dtype}, {sin.dtype}")
    eps = norm_q.eps if norm_q.eps is not None else torch.finfo(query.dtype).eps  # torch's RMSNorm default
    wq, wk = (n.weight.detach().to(device=q.device, dtype=torch.float32).contiguous() for n in (norm_q, norm_k))
    oq = torch.empty((batch, tokens, heads, head_dim), dtype=query.dtype, device=query.device)
    ok = torch.empty_like(oq)
    grid = (triton.cdiv(q.shape[0], block_r), 2)
    _qk_norm_rope_kernel[grid](q, k, wq, wk, oq, ok, cos, sin, q.shape[0], tokens, q.stride(0), k.stride(0), dim,
                               cos.stride(0), sin.stride(0), EPS=float(eps), H=heads, HD=head_dim,
                               BF16=query.dtype == torch.bfloat16, BLOCK_R=block_r, num_warps=4,
                               enable_fp_fusion=False)
    return oq, ok


@functools.cache
def fused_processor_class() -> type:
    """diffusers' Wan processor with the self-attention's norm and rotation in `qk_norm_rope`
    (made on first use: diffusers is imported only where a model is)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

    class FusedQKNormRopeProcessor(WanAttnProcessor):
        """Self-attention (no text context, float32 rotary tables as `from_pretrained` keeps
        them) through `qk_norm_rope`; every other call is diffusers' own. The rest of the
        self-attention path is diffusers' processor line for line (projections, dispatch,
        output), kept in step with 0.42.1."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            if (encoder_hidden_states is not None or rotary_emb is None or attn.add_k_proj is not None
                    or rotary_emb[0].dtype != torch.float32):  # a model cast whole: bf16 tables, diffusers' rounding
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            query, key, value = _get_qkv_projections(attn, hidden_states, None)
            query, key = qk_norm_rope(query, key, attn.norm_q, attn.norm_k, *rotary_emb, heads=attn.heads)
            value = value.unflatten(2, (attn.heads, -1))
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            out = out.flatten(2, 3).type_as(query)
            return attn.to_out[1](attn.to_out[0](out))

    return FusedQKNormRopeProcessor


def set_fused_qk_norm_rope(model: torch.nn.Module, on: bool) -> int:
    """Each Wan self-attention (`attn1`, RMSNorms over all heads) of `model` gets the fused
    processor (on) or diffusers' own back (off), keeping the processor's attention backend and
    context-parallel config; returns how many attention modules run fused."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    fused_cls = fused_processor_class()
    n = 0
    for name, attn in model.named_modules():
        proc = getattr(attn, "processor", None)
        if not name.endswith("attn1") or not isinstance(proc, WanAttnProcessor):
            continue
        norms_fit = all(isinstance(getattr(attn, a, None), torch.nn.RMSNorm) and getattr(attn, a).weight is not None
                        for a in ("norm_q", "norm_k"))
        want = fused_cls if on and norms_fit else WanAttnProcessor
        if type(proc) is not want:
            new = want()
            new.__dict__.update(proc.__dict__)  # the attention backend, the context-parallel config
            attn.processor = new
        n += int(want is fused_cls)
    return n
