"""Block-sparse self-attention (`gpubake.kernels.attention_sparse`): LightX2V's router
(ModelTC/LightX2V `lightx2v/common/ops/attn/utils/sla_util.py`, `get_block_map` /
`get_block_lut`: mean-pooled Q against mean-pooled, mean-smoothed K blocks, the
``max(1, min(K, int(ratio * K)))`` best key blocks per query block), the torch reference and
FlexAttention over a `BlockMask` of the route, on the CPU (eager FlexAttention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpubake.kernels import attention_sparse as S
from gpubake.errors import KernelError
from gpubake.kernels.attention import set_self_attention_kernel



def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b: int, h: int, n: int, d: int, seed: int, dtype=torch.float32, m: int | None = None):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, m, d, generator=g) + 3.0 * torch.randn(d, generator=g)  # offset: what smoothing removes
    v = torch.randn(b, h, m, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def hand_built() -> tuple[torch.Tensor, torch.Tensor]:
    """7 tokens, blocks of 2 (the last block of one token), head dim 2, one head; values
    exact in binary, and K's mean over tokens is 0, so every score below is exact.

    Query block means: [1, 0], [0, 1], [1, 0.5], [1, 6]. Key block means: [2, -2], [0, 2],
    [1, -1.5] and the lone last token [-6, 3] ([-3, 1.5] if a partial block were divided by
    the full block size). Scores of query blocks 0..3 against key blocks 0..3:
    q0 [2, 0, 1, -6], q1 [-2, 2, -1.5, 3], q2 [1, 1, 0.25, -4.5] (a tie at the top),
    q3 [-10, 12, -8, 12] (a tie at the top)."""
    q = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0.5], [1, 0.5], [1, 6]], dtype=torch.float32)
    k = torch.tensor([[3, -2], [1, -2], [0, 2], [0, 2], [1, -1.5], [1, -1.5], [-6, 3]], dtype=torch.float32)
    return q[None, None], k[None, None]


def test_router_keeps_the_best_block_of_the_hand_built_case():
    q, k = hand_built()
    r = S.route(q, k, keep=0.25, block_q=2, block_k=2)  # int(0.25 * 4) = 1 key block per query block
    assert r.kept == 1 and r.indices.shape == (1, 1, 4, 1) and r.indices.dtype == torch.int32
    # q1 keeps the lone last token's block (3 > 2: its mean is the token, not half of it);
    # q2 and q3 tie two blocks at the top: the lower index wins
    assert r.indices[0, 0, :, 0].tolist() == [0, 3, 0, 1]
    assert r.keep[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]
    shifted = S.route(q, k + torch.tensor([10.0, -4.0]), keep=0.25, block_q=2, block_k=2)  # K's mean: smoothed away
    assert torch.equal(shifted.keep, r.keep)


def test_router_keeps_the_kept_blocks_ascending():
    q, k = hand_built()
    r = S.route(q, k, keep=0.5, block_q=2, block_k=2)  # 2 of 4
    assert r.indices[0, 0, :, :2].tolist() == [[0, 2], [1, 3], [0, 1], [1, 3]]
    assert r.keep.sum(-1).flatten().tolist() == [2, 2, 2, 2]
    everything = S.route(q, k, keep=1.0, block_q=2, block_k=2)
    assert everything.kept == 4 and everything.keep.all() and everything.indices[0, 0].tolist() == [[0, 1, 2, 3]] * 4


def test_router_is_the_same_for_a_key_offset_and_per_head():
    """A constant added to every key moves each query block's scores by one constant (the
    smoothing removes it anyway): the route does not change. Heads and batches route apart."""
    q, k, _ = qkv(2, 3, 300, 16, seed=1)
    r = S.route(q, k, 0.3, 64, 128)
    assert torch.equal(S.route(q, k + 50.0, 0.3, 64, 128).indices[..., :r.kept], r.indices[..., :r.kept])
    assert r.indices.shape == (2, 3, 5, 1) and r.keep.shape == (2, 3, 5, 3) and r.kept == 1  # 300 tokens: 5 query,
    # 3 key blocks; int(0.9) -> 1
    alone = S.route(q[1:, 2:], k[1:, 2:], 0.3, 64, 128)
    assert torch.equal(alone.keep[0, 0], r.keep[1, 2])


def test_top_blocks_takes_the_highest_scores_ties_to_the_lower_index():
    """Against a plain Python oracle: indices ordered by (score descending, index), the first
    `kept`, ascending; -0.0 and +0.0 tie, as equal floats."""
    g = torch.Generator().manual_seed(5)
    coarse = (torch.randn(6, 40, generator=g) * 2).round() / 2  # many exact ties, both signs, zeros
    signed_zeros = torch.where(torch.rand(6, 40, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    extremes = torch.tensor([[float("inf"), -float("inf"), 3.0, -3.0, 1e-45, -1e-45, 3.4e38, -3.4e38]])
    for s, kept in ((coarse, 5), (coarse, 1), (coarse, 40), (signed_zeros, 7), (extremes, 3), (extremes, 6)):
        got = S.top_blocks(s, kept)
        want = [sorted(sorted(range(len(row)), key=lambda i, row=row: (-row[i], i))[:kept]) for row in s.tolist()]
        assert got.dtype == torch.int64 and got.tolist() == want, kept


@pytest.mark.parametrize(("blocks", "keep", "kept"), [
    (10, 0.1, 1), (10, 0.29, 2), (4, 0.1, 1), (1, 0.1, 1), (256, 0.1, 25), (591, 0.1, 59), (591, 0.2, 118),
    (10, 1.0, 10), (100, 0.29, 28),  # 0.29 * 100 = 28.999999999999996 in floats: int() gives 28, as LightX2V's
])
def test_keep_ratio_rounds_down_and_keeps_at_least_one(blocks, keep, kept):
    assert S.kept_blocks(blocks, keep) == kept


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "much", None])
def test_bad_keep_ratio_is_one_line(keep):
    with pytest.raises(S.SparseAttentionError, match=r"^sparse attention: keep ratio .*(not in \(0, 1\]|not a number)$"):
        S.kept_blocks(8, keep)


def test_router_refuses_mismatched_shapes_and_blocks():
    q, k, _ = qkv(1, 2, 64, 16, seed=0)
    with pytest.raises(S.SparseAttentionError, match="same batch, heads and head dim"):
        S.route(q, k[:, :1])
    with pytest.raises(S.SparseAttentionError, match="block sizes 0 x 128"):
        S.route(q, k, 0.5, 0, 128)


def test_reference_is_attention_over_the_kept_blocks_alone():
    """Rows of a query block that keeps one key block equal SDPA over that block's keys."""
    q, k, v = qkv(1, 2, 300, 16, seed=2)
    r = S.route(q, k, 0.2, 64, 128)  # int(0.6) -> 1 block
    out = S.sparse_attention_reference(q, k, v, r)
    for h in range(2):
        for qb in (0, 4):  # a full and the partial last query block (tokens 256..299)
            kb = int(r.indices[0, h, qb, 0])
            rows, cols = slice(qb * 64, min(qb * 64 + 64, 300)), slice(kb * 128, min(kb * 128 + 128, 300))
            want = F.scaled_dot_product_attention(q[:, h, rows], k[:, h, cols], v[:, h, cols])
            assert torch.allclose(out[:, h, rows], want, atol=1e-5, rtol=1e-5)


# Tolerances: eager FlexAttention computes the masked dense product in the input dtype, the
# reference in fp32: ~1e-6 relative in fp32, bf16 rounding of the output (2^-8) in bf16.
@pytest.mark.parametrize(("n", "m", "blocks", "keep", "dtype", "tol"), [
    (300, 300, (64, 128), 0.3, torch.float32, 1e-5),   # ragged: a 44-token last query and key block
    (256, 256, (64, 128), 0.5, torch.float32, 1e-5),   # block multiples
    (200, 333, (32, 64), 0.25, torch.float32, 1e-5),   # q and kv of different, ragged lengths
    (300, 300, (64, 128), 0.3, torch.bfloat16, 1e-2),
    (300, 300, (128, 128), 0.3, torch.float32, 1e-5),  # the plan's sparse_block_q=128
])
def test_flex_matches_the_reference(n, m, blocks, keep, dtype, tol):
    q, k, v = qkv(2, 3, n, 32, seed=n + m, dtype=dtype, m=m)
    r = S.route(q, k, keep, *blocks)
    out = S.flex_sparse_attention(q, k, v, keep, block_q=blocks[0], block_k=blocks[1])
    ref = S.sparse_attention_reference(q, k, v, r)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel(out, ref) < tol
    assert rel(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) > 0.05  # really sparse


def test_flex_traces_into_one_graph():
    """Router, BlockMask and FlexAttention trace without a graph break (what the compiled GPU
    path needs, inside a regionally compiled block or alone); same numbers as eager."""
    q, k, v = qkv(1, 2, 300, 32, seed=5)
    traced = torch.compile(S.flex_sparse_attention, backend="eager", fullgraph=True)
    assert torch.equal(traced(q, k, v, 0.3), S.flex_sparse_attention(q, k, v, 0.3))


def test_keep_one_is_dense_attention():
    q, k, v = qkv(1, 4, 300, 32, seed=3)
    out = S.flex_sparse_attention(q, k, v, 1.0)
    assert rel(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def test_short_sequences_run_dense_sdpa():
    q, k, v = qkv(1, 2, 300, 32, seed=4)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(S.sparse_attention(q, k, v, 0.3), dense)  # 300 < MIN_TOKENS
    sparse = S.sparse_attention(q, k, v, 0.3, min_tokens=256)
    assert rel(sparse, S.sparse_attention_reference(q, k, v, S.route(q, k, 0.3))) < 1e-5
    assert not torch.allclose(sparse, dense, atol=1e-2)


def test_backend_function_takes_diffusers_layout_and_refuses_masks():
    q, k, v = qkv(1, 2, 300, 32, seed=6)
    fn = S.backend_fn(0.3)
    assert S.backend_fn(0.3) is fn and S.backend_fn(0.2) is not fn  # one per ratio: the slot's entry stays put
    old = S.MIN_TOKENS
    try:
        S.MIN_TOKENS = 256  # read at call time (the threshold is a placeholder to be measured)
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    finally:
        S.MIN_TOKENS = old
    assert rel(out.transpose(1, 2), S.sparse_attention_reference(q, k, v, S.route(q, k, 0.3))) < 1e-5
    with pytest.raises(S.KernelError, match="sparse-flex attention: no mask"):
        fn(q, k, v, attn_mask=torch.ones(300, 300, dtype=torch.bool))
    with pytest.raises(S.SparseAttentionError, match="keep ratio 0.0"):
        S.backend_fn(0.0)


def test_set_sparse_self_attention_changes_only_self_attention(monkeypatch):
    """On a tiny Wan expert: every attn1 goes through the sparse backend, attn2 stays dense,
    and `set_self_attention_kernel(model, None)` restores the dense output exactly."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=64).eval()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 4, 2, 24, 24, generator=g)  # 2 x 12 x 12 = 288 video tokens
    ctx = torch.randn(1, 8, 16, generator=g)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(hidden_states=lat, timestep=torch.tensor([500]), encoder_hidden_states=ctx,
                         return_dict=False)[0]

    ref = forward()
    calls: list[tuple[int, int]] = []
    real = S.flex_sparse_attention

    def counting(q, k, v, keep, scale=None, **kw):
        calls.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, keep, scale, **kw)

    monkeypatch.setattr(S, "flex_sparse_attention", counting)
    monkeypatch.setattr(S, "MIN_TOKENS", 256)
    assert S.set_sparse_self_attention(model, 0.3) == 2
    out = forward()
    assert calls == [(288, 288), (288, 288)]  # the two self-attentions; cross-attention (8 keys) not
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    set_self_attention_kernel(model, None)
    assert torch.equal(forward(), ref)


class _CudaLike:
    """What `_kernel_options` reads of q (device kind, dtype) without a GPU."""
    is_cuda = True
    dtype = torch.bfloat16
    device = "cuda:0"


def test_kernel_options_divide_the_blocks_and_take_a_sweep_over_them(monkeypatch):
    monkeypatch.setattr(S, "_capability", lambda q: (8, 9))  # a GPU with no measured options
    r64 = S.route(*(torch.randn(1, 1, 256, 16) for _ in range(2)), 0.5, 64, 128)
    assert S._kernel_options(r64, _CudaLike()) == {"BLOCK_M": 64}  # 64-token query blocks: 64-row tiles
    assert S._kernel_options(r64, _CudaLike(), {"BLOCK_N": 128, "num_stages": 2}) == {
        "BLOCK_M": 64, "BLOCK_N": 128, "num_stages": 2}
    with pytest.raises(KernelError, match="BLOCK_M=128 does not divide the 64-token blocks"):
        S._kernel_options(r64, _CudaLike(), {"BLOCK_M": 128})
    assert S._kernel_options(r64, torch.zeros(1), {"BLOCK_N": 128}) is None  # the CPU: eager, no tiles


def test_the_measured_options_apply_on_their_gpu_and_query_block_only(monkeypatch):
    route = {bq: S.route(*(torch.randn(1, 1, 256, 16) for _ in range(2)), 0.5, bq, 128) for bq in (64, 128)}
    monkeypatch.setattr(S, "_capability", lambda q: (9, 0))
    assert S._kernel_options(route[64], _CudaLike()) == {"BLOCK_M": 64, "num_warps": 4, "USE_TMA": True}
    assert S._kernel_options(route[128], _CudaLike()) == {"USE_TMA": True}
    assert S._kernel_options(route[64], _CudaLike(), {"num_warps": 8}) == {"BLOCK_M": 64, "num_warps": 8, "USE_TMA": True}  # a sweep wins
    monkeypatch.setattr(S, "_capability", lambda q: (10, 0))  # Blackwell: not measured, torch's defaults
    assert S._kernel_options(route[128], _CudaLike()) is None
