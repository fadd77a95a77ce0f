"""The self-attention's fused Q/K RMS norm + RoPE (Triton, run by the interpreter here:
TRITON_INTERPRET=1, set by this folder's conftest) against diffusers' own arithmetic, and the
processor that puts it in a Wan model: the same prediction, the backend kept, back on off."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels.qk_norm_rope import (apply_rotary_reference, qk_norm_rope, qk_norm_rope_reference,
                                          set_fused_qk_norm_rope)
from testutil import tiny_forward


def _rope(frames: int, rows: int, cols: int, head_dim: int = 128):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    return WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 16, frames, rows * 2, cols * 2))


def _norms(dim: int, dtype, seed: int, eps: float = 1e-6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        n = torch.nn.RMSNorm(dim, eps=eps).to(dtype)
        with torch.no_grad():
            n.weight.copy_(1 + 0.2 * torch.randn(dim, generator=g))
        out.append(n)
    return out


def _qk(batch: int, tokens: int, dim: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, tokens, dim, generator=g) * 3).to(dtype)
    k = (torch.randn(batch, tokens, dim, generator=g) + torch.randn(1, 1, dim, generator=g) * 2).to(dtype)
    q[0, 0] = 0  # a token of zeros: the norm's eps alone
    return q, k


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def _close_to_reference(got, want, exact_at_least: float) -> None:
    """bf16: equal but for the sum of squares' order (a normalised value one ulp off, so an
    output within about one ulp of its inputs' size), on few values."""
    diff = (got.float() - want.float()).abs()
    assert float(diff.max()) <= 2.0 ** -7 * (1 + float(want.float().abs().max()))
    assert float((diff == 0).float().mean()) >= exact_at_least


def test_rotary_reference_is_diffusers_own():
    """The reference is the processor's inline function: the same bits from the same tables."""
    cos, sin = _rope(2, 3, 4)
    x = torch.randn(1, 24, 2, 128).bfloat16()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    want = torch.stack([x1 * cos[..., 0::2] - x2 * sin[..., 1::2], x1 * sin[..., 1::2] + x2 * cos[..., 0::2]], -1)
    assert torch.equal(apply_rotary_reference(x, cos, sin), want.flatten(-2).bfloat16())


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_is_the_reference_up_to_the_sum_order(heads, batch):
    cos, sin = _rope(3, 4, 5)
    tokens = cos.shape[1]
    norms = _norms(heads * 128, torch.bfloat16, seed=heads)
    for seed in range(2):
        q, k = _qk(batch, tokens, heads * 128, torch.bfloat16, seed + 10 * batch)
        want = qk_norm_rope_reference(q, k, *norms, cos, sin, heads)
        got = qk_norm_rope(q, k, *norms, cos, sin, heads, block_r=8)
        for g_, w_ in zip(got, want):
            assert g_.shape == (batch, tokens, heads, 128) and g_.dtype == torch.bfloat16
            _close_to_reference(g_, w_, exact_at_least=0.995)


def test_float32_is_the_reference_within_float32_rounding():
    cos, sin = _rope(2, 3, 4)
    q, k = _qk(1, cos.shape[1], 256, torch.float32, seed=3)
    norms = _norms(256, torch.float32, seed=4)
    for g_, w_ in zip(qk_norm_rope(q, k, *norms, cos, sin, 2), qk_norm_rope_reference(q, k, *norms, cos, sin, 2)):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_r", [1, 4, 16])
def test_block_size_and_a_ragged_last_block_change_nothing(block_r):
    cos, sin = _rope(1, 3, 7)  # 21 tokens: no block size divides them
    q, k = _qk(1, 21, 128, torch.bfloat16, seed=5)
    norms = _norms(128, torch.bfloat16, seed=6)
    base = qk_norm_rope(q, k, *norms, cos, sin, 1, block_r=2)
    for a, b in zip(qk_norm_rope(q, k, *norms, cos, sin, 1, block_r=block_r), base):
        assert torch.equal(a, b)


def test_a_fused_projections_chunk_is_read_through_its_row_stride():
    """diffusers' fused Q/K/V chunks its one output: Q and K are views with a 3x row stride."""
    cos, sin = _rope(1, 2, 3)
    qkv = torch.randn(1, 6, 3 * 256).bfloat16()
    q, k, _ = qkv.chunk(3, dim=-1)
    assert not q.is_contiguous()
    norms = _norms(256, torch.bfloat16, seed=7)
    for a, b in zip(qk_norm_rope(q, k, *norms, cos, sin, 2), qk_norm_rope(q.contiguous(), k.contiguous(), *norms, cos, sin, 2)):
        assert torch.equal(a, b)


def test_bad_shapes_are_one_line_kernel_errors():
    cos, sin = _rope(1, 2, 3)
    q, k = _qk(1, 6, 256, torch.bfloat16, seed=8)
    norms = _norms(256, torch.bfloat16, seed=9)
    with pytest.raises(KernelError, match="even power-of-two head size"):
        qk_norm_rope(q, k, *norms, cos, sin, 3)
    with pytest.raises(KernelError, match="same shape and dtype"):
        qk_norm_rope(q, k[:, :5], *norms, cos, sin, 2)
    with pytest.raises(KernelError, match="freqs_cos has 640 values for 6 tokens x 128"):
        qk_norm_rope(q, k, *norms, cos[:, :5], sin, 2)
    with pytest.raises(KernelError, match="norm_k must be an RMSNorm over 256 channels"):
        qk_norm_rope(q, k, norms[0], torch.nn.LayerNorm(256), cos, sin, 2)
    with pytest.raises(KernelError, match="rotary tables must be float32"):
        qk_norm_rope(q, k, *norms, cos.double(), sin.double(), 2)


@pytest.fixture
def tiny_bf16_expert():
    from diffusers import WanTransformer3DModel

    from gpubake.provisioning.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG).to(torch.bfloat16).eval()
    model.rope.float()  # as from_pretrained keeps it (`_keep_in_fp32_modules`)
    with torch.no_grad():  # norms away from their init of ones, so that a weight mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model


def test_the_fused_processor_gives_the_models_prediction_and_goes_back(tiny_bf16_expert, monkeypatch):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from gpubake.kernels import qk_norm_rope as module

    calls = []
    monkeypatch.setattr(module, "qk_norm_rope", lambda *a, **kw: calls.append(1) or qk_norm_rope(*a, **kw))
    model = tiny_bf16_expert
    want = tiny_forward(model)
    n = set_fused_qk_norm_rope(model, True)
    assert n == model.config.num_layers
    procs = [b.attn1.processor for b in model.blocks]
    assert all(type(p).__name__ == "FusedQKNormRopeProcessor" for p in procs)
    assert all(type(b.attn2.processor) is WanAttnProcessor for b in model.blocks)  # cross-attention stays
    got = tiny_forward(model)
    assert len(calls) == model.config.num_layers  # the kernel ran, once a block
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-2  # bf16 forward: a few one-ulp differences, carried through the blocks
    assert set_fused_qk_norm_rope(model, False) == 0
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in model.blocks)
    assert torch.equal(tiny_forward(model), want)


def test_the_fused_processor_keeps_the_attention_backend(tiny_bf16_expert):
    from gpubake.kernels.attention import route_self_attention

    route_self_attention(tiny_bf16_expert, "native")
    set_fused_qk_norm_rope(tiny_bf16_expert, True)
    assert all(b.attn1.processor._attention_backend == "native" for b in tiny_bf16_expert.blocks)
    set_fused_qk_norm_rope(tiny_bf16_expert, False)
    assert all(b.attn1.processor._attention_backend == "native" for b in tiny_bf16_expert.blocks)


def test_bf16_rotary_tables_keep_diffusers_path(tiny_bf16_expert):
    """A model cast whole to bf16 rotates with bf16 tables (other roundings than the kernel's):
    the processor leaves those calls to diffusers, bit for bit."""
    model = tiny_bf16_expert
    model.rope.to(torch.bfloat16)
    want = tiny_forward(model)
    set_fused_qk_norm_rope(model, True)
    assert torch.equal(tiny_forward(model), want)


def test_the_boot_check_passes_here_and_fails_a_wrong_kernel(monkeypatch):
    """`selfcheck.qk_norm_rope_selfcheck`, which the Hopper plan runs before it turns the lever on."""
    from gpubake.kernels import qk_norm_rope as module
    from gpubake.kernels.selfcheck import qk_norm_rope_selfcheck

    good = qk_norm_rope_selfcheck("cpu")
    assert good["ok"] and good["bit_equal_fraction"] >= 0.99, good
    real = module.qk_norm_rope
    # a kernel that reads the rotary tables the wrong way round
    monkeypatch.setattr(module, "qk_norm_rope", lambda q, k, nq, nk, cos, sin, heads: real(q, k, nq, nk, sin, cos, heads))
    bad = qk_norm_rope_selfcheck("cpu")
    assert not bad["ok"] and "bit-equal" in bad["reason"]


def test_every_fused_lever_has_its_boot_check_tested():
    from gpubake.provisioning.runtime import FUSED_KERNELS

    assert set(FUSED_KERNELS) == set(FUSED_LEVERS)


FUSED_LEVERS = ["fuse_qk_rope", "vae_fused_norm", "fuse_ffn_gelu", "fuse_norm_quant"]


@pytest.mark.parametrize("lever", FUSED_LEVERS)
def test_each_fused_pass_passes_its_boot_check_here(lever):
    """`runtime.fused_selfcheck`: the check the plan runs on the GPU before it takes each fusion
    lever (runtime.FUSED_KERNELS) passes for the kernels as they are (here: the interpreter)."""
    from gpubake.provisioning.runtime import FUSED_KERNELS, fused_selfcheck

    assert lever in FUSED_KERNELS
    got = fused_selfcheck(lever, "cpu")
    assert got["ok"] and got["bit_equal_fraction"] >= 0.99, got


def test_the_boot_checks_fail_a_pass_that_computes_something_else(monkeypatch):
    """A VAE norm that forgets its SiLU, a GELU-quantizer that forgets the GELU, a norm-quantizer
    that forgets the modulation: each check says no."""
    from gpubake.kernels import convert_triton, norm_quant, vae_norm
    from gpubake.provisioning.runtime import fused_selfcheck

    real_norm, real_quant, real_nq = vae_norm.rms_norm_silu, convert_triton.fp8_rowwise, norm_quant.layer_norm_fp8
    monkeypatch.setattr(vae_norm, "rms_norm_silu", lambda x, g, s, silu=True: real_norm(x, g, s, silu=False))
    monkeypatch.setattr(convert_triton, "fp8_rowwise", lambda x, gelu=False: real_quant(x))
    monkeypatch.setattr(norm_quant, "layer_norm_fp8", lambda x, eps, *a, **kw: real_nq(x, eps))
    for lever in ("vae_fused_norm", "fuse_ffn_gelu", "fuse_norm_quant"):
        got = fused_selfcheck(lever, "cpu")
        assert not got["ok"] and "bit-equal" in got["reason"], (lever, got)
