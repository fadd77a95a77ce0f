"""Training-free block-sparse self-attention (issue 14 item 6, issue 18): a router, a torch
reference and FlexAttention.

LightX2V's NVFP4 Wan 2.2 checkpoint (lightx2v/Wan2.2-NVFP4-Sparse) was distilled with 90 %
sparse self-attention (its config `configs/wan22/extreme/wan_moe_t2v_distill_nvfp4_sparse_attn
.json`: ``dynamic_sparse_attn``, ``sparsity_ratio`` 0.9, operator ``sage2``). What we follow
from ModelTC/LightX2V (read, not copied):

* `lightx2v/common/ops/attn/utils/sla_util.py`, `get_block_map` / `get_block_lut`: K loses
  its mean over all tokens (SageAttention's smoothing, `centered_mean_pool`); Q and the
  smoothed K are mean-pooled per block of tokens (a partial last block is the mean of the
  tokens it has, `compress_kernel`'s ``nx``); the pooled blocks' dot products score each
  query block against each key block, and each query block keeps its ``max(1, min(K,
  int(ratio * K)))`` best key blocks (K key blocks, ratio = 1 - sparsity).
* `lightx2v/common/ops/attn/dynamic_sparse_attn.py`: the ``sage2`` operator's blocks, 64
  query x 128 key tokens on sm_90 (128 x 64 elsewhere); the ``fa4`` operator hands the kept
  blocks to the kernel as *full* blocks (no per-element mask), as `block_mask` does here.

Differences, on purpose: the pooling and scores are fp32 (LightX2V rounds the pooled blocks
to the input dtype), and ties are broken towards the lower key-block index (LightX2V's
``torch.topk(sorted=False)`` leaves ties to the device), so the route is the same on every
device. The smoothing is taken after the pooling (a block's mean of ``k - mean(k)`` is its mean
of ``k`` less ``mean(k)``, the same up to fp32 rounding), so K is read once. LightX2V's kernel is SageAttention-2 (INT8/FP8, CUDA builds, no wheel);
ours is PyTorch's FlexAttention (Triton on Hopper, C++ or eager on the CPU) in BF16.

Layout as in `gpubake.kernels.attention`: the functions take [B, H, N, D] (SDPA's layout,
views of diffusers' [B, N, H, D] memory); the diffusers backend function transposes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gpubake.errors import KernelError

BLOCK_Q, BLOCK_K = 64, 128  # LightX2V's sage2 blocks on sm_90 (tokens)
# query-block sizes the runtime plan offers (`sparse_block_q`): LightX2V's 64, and 128, the
# Triton kernel's own tile (H200, 2026-12-01: 6.1 ms against 9.6 ms a 480p call at keep 0.1)
BLOCKS_Q = (64, 128)
DEFAULT_KEEP = 0.1  # LightX2V's distillation: sparsity_ratio 0.9
# PLACEHOLDER below 32,760 tokens: self-attention over fewer tokens runs dense (torch SDPA).
# H200, 2026-12-01: keep 0.1 is 2.4x FA3 FP8 at 32,760 tokens (480x832x81) and 2.5x at 75,600,
# so the break-even lies lower, but no shorter length was measured (bench/bench_sparse_attention.py
# --tokens; the self-test's clip has 7,800 tokens). (That run's 0.08 ms for the router timed
# nothing: its row returned what does not depend on the route; in a compiled 480p block the
# router's kernels took ~0.9 ms, 2026-12-03 profile.)
MIN_TOKENS = 8192
# FlexAttention's Triton options per GPU and query block, measured (`bench/bench_sparse_attention.py`
# -k variants; H200, 2026-12-03, docs/benchmarks.md "FlexAttention's tiles"): torch 2.11's sm_90
# default for BF16 at head dim 128 is 8 warps, which at 64-row tiles leaves each warp 8 rows:
# 4 warps make the 64-token call 1.52x / 1.46x faster (720p 50.1 -> 32.9 ms, 480p 9.49 -> 6.50);
# at 128-row tiles 4 warps are slower and TMA loads take 4-6 % (720p 29.9 -> 28.5 ms, 480p
# 6.05 -> 5.66). TMA on top of 4 warps at 64-row tiles (2026-12-06): 480p 6.38 -> 5.50 ms
# (1.16x); 2 or 4 stages instead of 3 slower (6.77, 8.37). Output: the same bits (w4, TMA) as the
# untuned kernel. GPUs not listed keep torch's defaults (not measured there).
TUNED_KERNEL_OPTIONS: dict[tuple[int, int], dict[int, dict]] = {
    (9, 0): {64: {"num_warps": 4, "USE_TMA": True}, 128: {"USE_TMA": True}},
}


class SparseAttentionError(KernelError):
    """A sparse-attention argument (keep ratio, block size, shape) is out of range."""


class Route(NamedTuple):
    """Which key blocks each query block attends to.

    `indices`: int32 [B, H, Q blocks, kept]; per query block its `kept` key blocks in
    ascending order (FlexAttention reads a row's first `kept` entries; the rest of a row would
    be unread, so there is none). `keep`: bool [B, H, Q blocks, K blocks], the same selection
    as a map."""

    indices: torch.Tensor
    keep: torch.Tensor
    kept: int
    block_q: int
    block_k: int


def check_keep(keep: float) -> float:
    """`keep` as a float in (0, 1], or a one-line error."""
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise SparseAttentionError(f"sparse attention: keep ratio {keep!r} is not a number") from None
    if not 0.0 < keep <= 1.0:  # (NaN fails too)
        raise SparseAttentionError(f"sparse attention: keep ratio {keep} is not in (0, 1]")
    return keep


def kept_blocks(num_k_blocks: int, keep: float) -> int:
    """Key blocks each query block keeps: ``int(keep * K)`` as LightX2V's router computes it
    (float product, truncated), at least one and at most all."""
    return max(1, min(num_k_blocks, int(check_keep(keep) * num_k_blocks)))


def block_sums(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N, D] -> (fp32 [B, H, ceil(N / block), D] sums of each block's tokens, fp32
    [ceil(N / block)] token counts: a partial last block counts the tokens it has)."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    sums = F.pad(x.float(), (0, 0, 0, nb * block - n)).reshape(b, h, nb, block, d).sum(dim=-2)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = n - (nb - 1) * block
    return sums, counts


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, N, D] -> fp32 [B, H, ceil(N / block), D]: the mean of each block's tokens (a
    partial last block: of the tokens it has)."""
    sums, counts = block_sums(x, block)
    return sums / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> torch.Tensor:
    """fp32 [B, H, Q blocks, K blocks]: pooled Q blocks against pooled, mean-smoothed K blocks.
    The smoothing comes after K's pooling (K's mean is its block sums' sum over N): one pass
    over K instead of two."""
    k_sums, k_counts = block_sums(k, block_k)
    k_mean = k_sums.sum(dim=-2, keepdim=True) / k.shape[-2]
    return block_mean(q, block_q) @ (k_sums / k_counts[:, None] - k_mean).transpose(-1, -2)


def top_blocks(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """int64 [..., kept]: per row the `kept` highest scores' indices, ascending; ties to the
    lower index (a stable descending sort's first `kept`). A `topk` over int64 keys that order
    by score, then by index, selects the same without sorting the row, but on an H200
    (2026-12-04, 720p: 40 heads x 591 x 591 scores) its radix passes took 1.27 ms a block
    against the sort's 0.78: the sort stays."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :kept], dim=-1).values  # ascending: the kernel walks keys in order


def _check_shapes(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise SparseAttentionError(f"sparse attention: q {tuple(q.shape)} and k {tuple(k.shape)} are not "
                                   "[B, H, N, D] with the same batch, heads and head dim")
    if not (isinstance(block_q, int) and isinstance(block_k, int) and block_q > 0 and block_k > 0):
        raise SparseAttentionError(f"sparse attention: block sizes {block_q!r} x {block_k!r} are not positive integers")


def route(q: torch.Tensor, k: torch.Tensor, keep: float = DEFAULT_KEEP, block_q: int = BLOCK_Q,
          block_k: int = BLOCK_K) -> Route:
    """The router: per (batch, head, query block), the `kept_blocks` best-scoring key blocks
    (`block_scores`, `top_blocks`), ties to the lower key-block index."""
    _check_shapes(q, k, block_q, block_k)
    return route_from_scores(block_scores(q, k, block_q, block_k), keep, block_q, block_k)


def route_from_scores(scores: torch.Tensor, keep: float, block_q: int, block_k: int) -> Route:
    """The route of block scores ([B, H, Q blocks, K blocks]): each query block's `kept_blocks`
    best (`top_blocks`), as indices and as a map."""
    kept = kept_blocks(scores.shape[-1], keep)
    chosen = top_blocks(scores, kept)
    keep_map = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
    return Route(chosen.to(torch.int32), keep_map, kept, block_q, block_k)


def token_mask(r: Route, q_len: int, kv_len: int) -> torch.Tensor:
    """bool [B, H, q_len, kv_len]: the route's blocks as an element mask (the reference's)."""
    rows = torch.arange(q_len, device=r.keep.device) // r.block_q
    cols = torch.arange(kv_len, device=r.keep.device) // r.block_k
    return r.keep[:, :, rows][:, :, :, cols]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: Route,
                               scale: float | None = None) -> torch.Tensor:
    """Plain torch: dense fp32 scores, the keys outside the route's blocks at -inf, softmax,
    times v; q's dtype out ([B, H, N, D]). The oracle of `flex_sparse_attention`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask(r, q.shape[-2], k.shape[-2]), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def block_mask(r: Route, q_len: int, kv_len: int):
    """FlexAttention's `BlockMask` of a route: the kept blocks as full blocks (the kernel
    computes them without a per-element mask; the sequence ends are its own bounds check),
    and a `mask_mod` reading the same map, which the eager (dense) path applies."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, nq, _ = r.indices.shape
    counts = torch.full((b, h, nq), r.kept, dtype=torch.int32, device=r.indices.device)
    keep, bq, bk = r.keep, r.block_q, r.block_k

    def mask_mod(batch, head, q_idx, kv_idx):
        return keep[batch, head, q_idx // bq, kv_idx // bk]

    return BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(r.indices), counts, r.indices,
                                    BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
                                    compute_q_blocks=False)  # forward only: no transposed (backward) index


def _capability(q: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(q.device)


def _kernel_options(r: Route, q: torch.Tensor, extra: dict | None = None) -> dict | None:
    """Triton tiles that divide the mask's blocks (diffusers' `_native_flex_attention` does
    the same; torch's defaults are 128 query x 64 key rows for 16-bit inputs), then the
    options measured for this GPU and query block (`TUNED_KERNEL_OPTIONS`). `extra` (a
    bench's sweep) goes over them; tiles it names must divide the blocks too."""
    if not q.is_cuda:
        return None
    opts = {}
    if r.block_q % (64 if q.dtype == torch.float32 else 128):
        opts["BLOCK_M"] = math.gcd(r.block_q, 128)
    if r.block_k % 64:
        opts["BLOCK_N"] = math.gcd(r.block_k, 64)
    if q.dtype != torch.float32:  # (measured in BF16)
        opts.update(TUNED_KERNEL_OPTIONS.get(_capability(q), {}).get(r.block_q, {}))
    opts.update(extra or {})
    for tile, block in (("BLOCK_M", r.block_q), ("BLOCK_N", r.block_k)):
        if tile in opts and block % opts[tile]:
            raise KernelError(f"sparse-flex: kernel option {tile}={opts[tile]} does not divide the {block}-token blocks")
    return opts or None


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: float = DEFAULT_KEEP,
                          scale: float | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                          kernel_options: dict | None = None) -> torch.Tensor:
    """Route, then FlexAttention over the kept blocks ([B, H, N, D] in, q's dtype out).

    Eager here: under torch.compile (a regionally compiled block, or `compiled`) the router,
    the mask and the attention become one graph with FlexAttention's fused kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    r = route(q, k, keep, block_q, block_k)
    bm = block_mask(r, q.shape[-2], k.shape[-2])
    return flex_attention(q, k, v, block_mask=bm, scale=scale, kernel_options=_kernel_options(r, q, kernel_options))


_COMPILED: list = []


def compiled():
    """`flex_sparse_attention` under torch.compile (one per process; static shapes)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(flex_sparse_attention, dynamic=False))
    return _COMPILED[0]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: float = DEFAULT_KEEP,
                     scale: float | None = None, min_tokens: int | None = None,
                     block_q: int = BLOCK_Q) -> torch.Tensor:
    """Block-sparse self-attention where it pays, torch SDPA where it does not ([B, H, N, D]).

    Dense below `min_tokens` (default `MIN_TOKENS`, read at call time) query or key tokens.
    On CUDA, outside a compiled region, the compiled FlexAttention (eager FlexAttention is an
    unfused dense fallback); on the CPU, eager."""
    min_tokens = MIN_TOKENS if min_tokens is None else min_tokens
    if q.shape[-2] < min_tokens or k.shape[-2] < min_tokens:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    fn = compiled() if q.is_cuda and not torch.compiler.is_compiling() else flex_sparse_attention
    return fn(q, k, v, keep, scale, block_q=block_q)


# The diffusers attention-backend slot sparse self-attention fills (diffusers==0.42.1): the
# slot of FlexAttention, whose stock entry runs it with no mask. One function per keep ratio
# and query block, so the slot's entry is the same object while a plan is in use (dynamo
# guards on it).
DIFFUSERS_SLOT = "flex"
_BACKEND_FNS: dict[tuple[float, int], object] = {}


def check_block_q(block_q: int) -> int:
    if isinstance(block_q, bool) or block_q not in BLOCKS_Q:
        raise SparseAttentionError(f"sparse attention: query block {block_q!r} is not one of "
                                   f"{', '.join(map(str, BLOCKS_Q))}")
    return block_q


def backend_fn(keep: float, block_q: int = BLOCK_Q):
    """diffusers' attention-backend function for block-sparse self-attention at `keep`, with
    `block_q`-token query blocks."""
    keep, block_q = check_keep(keep), check_block_q(block_q)
    if (keep, block_q) not in _BACKEND_FNS:
        def fn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               is_causal: bool = False, scale: float | None = None, return_lse: bool = False,
               _parallel_config=None) -> torch.Tensor:
            """diffusers' attention-backend signature: [B, N, H, D] in and out."""
            if attn_mask is not None or is_causal or return_lse or _parallel_config is not None:
                raise KernelError("sparse-flex attention: no mask, causal, LSE or context parallelism "
                                  "(self-attention only)")
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            return sparse_attention(q, k, v, keep, scale, block_q=block_q).transpose(1, 2)

        fn.__name__ = f"gpubake_sparse_flex_{keep:g}_q{block_q}_attention".replace(".", "_")
        _BACKEND_FNS[(keep, block_q)] = fn
    return _BACKEND_FNS[(keep, block_q)]


def set_sparse_self_attention(model: torch.nn.Module, keep: float = DEFAULT_KEEP, block_q: int = BLOCK_Q) -> int:
    """Route the self-attention (`attn1`) of every block of a diffusers DiT through
    block-sparse FlexAttention at `keep`; returns how many attention modules changed.
    Cross-attention (`attn2`, 512 text tokens) stays dense. `attention.set_self_attention_kernel
    (model, None)` puts them back on torch SDPA."""
    from diffusers.models import attention_dispatch as ad

    from gpubake.kernels.attention import route_self_attention

    fn = backend_fn(keep, block_q)
    name = ad.AttentionBackendName(DIFFUSERS_SLOT)
    if ad._AttentionBackendRegistry._backends.get(name) is not fn:
        ad._AttentionBackendRegistry.register(name)(fn)
    return route_self_attention(model, name)
