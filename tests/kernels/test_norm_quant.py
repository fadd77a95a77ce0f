"""A Wan block's LayerNorm + modulation with the FP8 per-token quantization of the linears it
feeds, as one Triton pass (`gpubake.kernels.norm_quant`, run by the interpreter here), against
its reference, and the reference against what diffusers' own block hands its linears."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels.fp8_ref import fp8_rowwise_ref
from gpubake.kernels.norm_quant import layer_norm_fp8, layer_norm_fp8_reference
from testutil import cpu_hopper_fp8


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _assert_close_codes(got, want, min_equal: float = 0.999):
    """Scales within a few float32 ulps (the mean and variance's summation order), codes the
    reference's on nearly every value and the next E4M3 code on the rest."""
    (q, s), (rq, rs) = got, want
    assert q.dtype == torch.float8_e4m3fn and q.shape == rq.shape and s.shape == rs.shape == (q.shape[0], 1)
    assert float(((s - rs).abs() / rs).max()) <= 6e-7  # a few float32 ulps (fp32 input: no bf16 rounding hides them)
    same = _codes(q) == _codes(rq)
    assert float(same.float().mean()) >= min_equal
    assert not (~same).any() or int((_codes(q).int() - _codes(rq).int()).abs()[~same].max()) <= 1


def _inputs(b: int, s: int, k: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, k, generator=g) * torch.exp(torch.randn(b, s, 1, generator=g)) + 0.3).to(dtype)
    table = torch.randn(b, 6, k, generator=g) * 0.3  # a block's scale_shift_table + temb: chunks are views
    shift, scale = table.chunk(6, dim=1)[:2]
    return x, scale, shift, 1 + 0.2 * torch.randn(k, generator=g), 0.1 * torch.randn(k, generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [320, 1000, 2048])  # under, not a multiple of, and two sweep steps
def test_fused_pass_quantizes_what_the_reference_does(dtype, k):
    x, scale, shift, w, b = _inputs(2, 19, k, dtype, seed=k)
    for kw in ({}, {"scale": scale, "shift": shift}, {"weight": w, "bias": b}):  # norm1/3 plain, modulated; norm2
        _assert_close_codes(layer_norm_fp8(x, 1e-6, **kw), layer_norm_fp8_reference(x, 1e-6, **kw))
    plain = layer_norm_fp8(x, 1e-6)[0]
    assert float((_codes(plain) == _codes(layer_norm_fp8(x, 1e-6, scale=scale, shift=shift)[0])).float().mean()) < 0.5


def test_the_reference_is_what_diffusers_block_hands_its_linears():
    """Hooks on a real WanTransformerBlock's attn1, attn2 and ffn catch their inputs; their FP8
    quantization (`fp8_rowwise_ref`, what hopper-fp8 does) is the reference's of the block's
    hidden states, modulation and norms, and the fused pass's up to its last-code rounding."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(0)
    dim, heads = 256, 2
    block = WanTransformerBlock(dim, 512, heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    with torch.no_grad():
        block.norm2.weight.normal_(1.0, 0.2)
        block.norm2.bias.normal_(0.0, 0.1)
    block = block.to(torch.bfloat16)
    seen: dict[str, torch.Tensor] = {}
    for name in ("attn1", "attn2", "ffn"):
        getattr(block, name).register_forward_pre_hook(lambda m, args, n=name: seen.setdefault(n, args[0]))
    seen_hidden: list[torch.Tensor] = []
    block.norm2.register_forward_pre_hook(lambda m, args: seen_hidden.append(args[0]))
    block.norm3.register_forward_pre_hook(lambda m, args: seen_hidden.append(args[0]))
    x = torch.randn(1, 24, dim).bfloat16()
    temb = torch.randn(1, 6, dim)
    rope = (torch.ones(1, 24, 1, dim // heads), torch.zeros(1, 24, 1, dim // heads))
    with torch.no_grad():
        block(x, torch.randn(1, 8, dim).bfloat16(), temb, rope)
    shift, scale, _, c_shift, c_scale, _ = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    h2, h3 = (h.type_as(x) for h in seen_hidden)  # the norms see hidden.float(): the bf16 states
    cases = {"attn1": (x, {"scale": scale, "shift": shift}),
             "attn2": (h2, {"weight": block.norm2.weight, "bias": block.norm2.bias}),
             "ffn": (h3, {"scale": c_scale, "shift": c_shift})}
    for name, (hidden, kw) in cases.items():
        want = fp8_rowwise_ref(seen[name].reshape(-1, dim))
        ref = layer_norm_fp8_reference(hidden, 1e-6, **kw)
        assert torch.equal(_codes(ref[0]), _codes(want[0])) and torch.equal(ref[1], want[1]), name
        _assert_close_codes(layer_norm_fp8(hidden, 1e-6, **kw), want, min_equal=0.99)


@pytest.mark.parametrize("bad, match", [
    ({"x": torch.zeros(4, 8)}, r"must be bf16 or float32 \[B, S, K\]"),
    ({"x": torch.zeros(1, 4, 8, dtype=torch.float16)}, r"must be bf16 or float32"),
    ({"weight": torch.ones(8)}, "weight and bias come together"),
    ({"scale": torch.zeros(1, 1, 8)}, "so do scale and shift"),
    ({"weight": torch.ones(7), "bias": torch.zeros(7)}, r"weight must be \[8\]"),
    ({"scale": torch.zeros(1, 4, 8), "shift": torch.zeros(1, 4, 8)}, r"scale must be float32 \[1, 1, 8\]"),
    ({"scale": torch.zeros(1, 1, 8, dtype=torch.bfloat16), "shift": torch.zeros(1, 1, 8)}, "scale must be float32"),
])
def test_bad_arguments_are_one_line_kernel_errors(bad, match):
    kw = {"x": torch.zeros(1, 4, 8, dtype=torch.bfloat16), **bad}
    with pytest.raises(KernelError, match=match):
        layer_norm_fp8(kw.pop("x"), 1e-6, **kw)


@pytest.fixture
def tiny_nvfp4_expert():
    """The tiny Wan expert in bf16, every block linear NVFP4 on hopper-fp8's arithmetic, norm2's
    affine away from its init (so that a weight or bias mix-up shows)."""
    from diffusers import WanTransformer3DModel

    from gpubake.kernels.linear import NVFP4Linear, bind_backends
    from gpubake.provisioning.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG).to(torch.bfloat16).eval()
    model.rope.float()
    with torch.no_grad():
        for block in model.blocks:
            block.norm2.weight.normal_(1.0, 0.2)
            block.norm2.bias.normal_(0.0, 0.1)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NVFP4Linear.from_linear(mod))
    bind_backends(model, cpu_hopper_fp8())
    return model


def test_fused_blocks_give_the_models_prediction_and_go_back(tiny_nvfp4_expert, monkeypatch):
    from gpubake.kernels import norm_quant as module
    from testutil import tiny_forward

    model = tiny_nvfp4_expert
    calls = []
    monkeypatch.setattr(module, "layer_norm_fp8", lambda *a, **kw: calls.append(1) or layer_norm_fp8(*a, **kw))
    want = tiny_forward(model)
    assert module.set_fused_norm_quant(model, True) == model.config.num_layers
    got = tiny_forward(model)
    assert len(calls) == 3 * model.config.num_layers  # each block's three norms, once each
    assert float((got - want).norm() / want.norm()) < 1e-2  # the same codes but for a few last-code roundings
    assert module.set_fused_norm_quant(model, False) == 0
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert torch.equal(tiny_forward(model), want)


def test_blocks_whose_linears_quantize_their_own_input_stay_as_they_are(tiny_nvfp4_expert):
    from gpubake.kernels import norm_quant as module
    from gpubake.kernels.backends import CpuReference
    from gpubake.kernels.linear import bind_backends
    from testutil import tiny_forward

    model = tiny_nvfp4_expert
    model.blocks[0].ffn.net[0].proj.bind_backend(CpuReference())  # one reader of block 0 that takes no rows
    assert module.set_fused_norm_quant(model, True) == model.config.num_layers - 1
    assert "forward" not in model.blocks[0].__dict__ and "forward" in model.blocks[1].__dict__
    bind_backends(model, CpuReference())  # bound after the plan applied the lever: refused in one line
    with pytest.raises(KernelError, match="activations arrive quantized .*apply the runtime plan again"):
        tiny_forward(model)
    assert module.set_fused_norm_quant(model, True) == 0  # applied again: nothing fuses, the forward runs
    tiny_forward(model)


def test_an_expert_waiting_on_the_host_is_fused_by_its_bound_backend(tiny_nvfp4_expert):
    """expert_offload applies the plan while an expert sits in host memory: the bound backend
    (a GPU one there) decides, not what could run on the host."""
    from gpubake.kernels import norm_quant as module
    from gpubake.kernels.backends import HopperFp8
    from gpubake.kernels.linear import bind_backends

    model = tiny_nvfp4_expert
    bind_backends(model, HopperFp8())  # the real, CUDA-only backend, the model on the CPU
    assert module.set_fused_norm_quant(model, True) == model.config.num_layers
