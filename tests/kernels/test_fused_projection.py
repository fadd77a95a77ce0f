"""Q, K and V as one GEMM (`FusedNVFP4Projection`) give what the three layers give: on the
CPU reference (one after another), through hopper-fp8's `apply_fused` (its Triton kernels in
the interpreter, torch's CPU `_scaled_mm`), cached FP8 weights included, and through
blackwell-native's (its real `operands_fused`, the FP4 GEMM's algebra emulated in float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpubake.errors import KernelError
from gpubake.kernels.backends import BlackwellNative, CpuReference
from gpubake.kernels.format import BLOCK, unswizzle_scales
from gpubake.kernels.linear import FusedNVFP4Projection, NVFP4Linear
from testutil import cpu_hopper_fp8, decode_operand


def _parts(gen, k=64, outs=(48, 48, 32)):
    parts = []
    for n in outs:
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen)))
            lin.bias.copy_(torch.randn(n, generator=gen))
        parts.append(NVFP4Linear.from_linear(lin))
    return parts


@pytest.mark.parametrize("backend", [CpuReference(), cpu_hopper_fp8()])
def test_fused_equals_the_parts(gen, backend):
    parts = _parts(gen)
    for p in parts:
        p.bind_backend(backend)
    parts[1].set_keep_runtime_weight(True)  # one part's FP8 weight cached: copied into the fused one
    fused = FusedNVFP4Projection(parts)
    x = torch.randn(2, 37, 64, generator=gen).to(torch.bfloat16)
    want = torch.cat([p(x) for p in parts], dim=-1)
    got = fused(x)
    assert got.shape == (2, 37, 128) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_fused_holds_no_tensor_of_its_own(gen):
    parts = _parts(gen)
    parent = nn.Module()
    parent.to_q, parent.to_k, parent.to_v = parts
    keys = set(parent.state_dict())
    parent.to_qkv = FusedNVFP4Projection(parts)
    assert set(parent.state_dict()) == keys and not list(parent.to_qkv.parameters())


def test_parts_of_different_inputs_are_refused(gen):
    a, b = _parts(gen, outs=(16,))[0], _parts(gen, k=32, outs=(16,))[0]
    with pytest.raises(KernelError, match="one input size"):
        FusedNVFP4Projection([a, b])
    with pytest.raises(KernelError, match="two or more"):
        FusedNVFP4Projection([a])


def test_blackwell_fused_equals_the_parts(gen, emulated_blackwell):
    """Per-call activation scale: one quantization of x, alpha per part's columns."""
    parts = _parts(gen, outs=(48, 144, 32))  # rows not a multiple of the swizzle's 128
    parts[2].bias = None
    for p in parts:
        p.bind_backend(emulated_blackwell)
    fused = FusedNVFP4Projection(parts)
    x = torch.randn(3, 29, 64, generator=gen).to(torch.bfloat16)
    assert emulated_blackwell.can_fuse([p.prepared(x.device)[1] for p in parts])
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_blackwell_fused_operands_are_the_parts_side_by_side(gen, emulated_blackwell):
    parts = _parts(gen)
    pws = [emulated_blackwell.prepare(p.nvfp4_weight()) for p in parts]
    x2 = torch.randn(37, 64, generator=gen).to(torch.bfloat16)
    fused = emulated_blackwell.operands_fused(x2, pws)
    each = [emulated_blackwell.operands(x2, pw) for pw in pws]
    assert torch.equal(fused["a"], each[0]["a"]) and torch.equal(fused["scale_a"], each[0]["scale_a"])
    assert torch.equal(fused["b"], torch.cat([op["b"] for op in each]))
    scales = [unswizzle_scales(op["scale_b"], pw.out_features, 64 // BLOCK).view(torch.uint8) for op, pw in zip(each, pws)]
    assert torch.equal(unswizzle_scales(fused["scale_b"], 128, 64 // BLOCK).view(torch.uint8), torch.cat(scales))
    want_alpha = torch.cat([op["alpha"].reshape(1).expand(pw.out_features) for op, pw in zip(each, pws)])
    assert torch.equal(fused["alpha"], want_alpha)
    assert len(set(pw.weight.global_scale.item() for pw in pws)) == 3  # the parts' own global scales


def test_blackwell_fuses_static_scales_only_when_they_agree(gen, emulated_blackwell):
    parts = _parts(gen)
    x = torch.randn(2, 11, 64, generator=gen).to(torch.bfloat16)
    for p in parts:
        p.bind_backend(emulated_blackwell)
        p.set_input_global_scale(float(x.abs().amax()) / (448 * 6))
    fused = FusedNVFP4Projection(parts)
    pws = lambda: [p.prepared(x.device)[1] for p in parts]  # noqa: E731
    assert emulated_blackwell.can_fuse(pws())
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    parts[1].set_input_global_scale(2 * float(x.abs().amax()) / (448 * 6))  # K calibrated apart
    assert not emulated_blackwell.can_fuse(pws())
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))  # the parts in turn
    parts[1].set_input_global_scale(None)  # one part dynamic, the others static
    assert not emulated_blackwell.can_fuse(pws())
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def _fp4_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """`torch._scaled_mm` on FP4 operands as it defines them (the CPU cannot run it): the
    decoded operands' product in float64, rounded to out_dtype."""
    k = a.shape[1] * 2
    b = b.t()  # [N, K/2] as stored
    return (decode_operand(a, scale_a, a.shape[0], k).double()
            @ decode_operand(b, scale_b, b.shape[0], k).double().t()).to(out_dtype)


def test_blackwell_gemm_glue_fused_equals_the_parts(gen, monkeypatch, emulated_blackwell):
    """blackwell-native's own `apply` and `apply_fused` (alpha, bias, shapes), only the FP4
    tensor-core call stood in for: the fused projection gives the parts' output bit for bit,
    and it agrees with the float64 emulation to bf16 rounding."""
    monkeypatch.setattr(torch, "_scaled_mm", _fp4_scaled_mm)
    cpu_blackwell = type("CpuBlackwell", (BlackwellNative,), {"needs_cuda": False})()
    parts = _parts(gen, outs=(48, 144, 32))
    parts[0].bias = None
    for p in parts:
        p.bind_backend(cpu_blackwell)
    x = torch.randn(2, 19, 64, generator=gen).to(torch.bfloat16)
    want = torch.cat([p(x) for p in parts], dim=-1)
    got = FusedNVFP4Projection(parts)(x)
    assert got.shape == (2, 19, 224) and torch.equal(got, want)
    emulated = torch.cat([emulated_blackwell.apply(x, p.prepared(x.device)[1], p.bias) for p in parts], dim=-1)
    assert torch.allclose(got.float(), emulated.float(), rtol=2**-6, atol=1e-3 * float(emulated.abs().max()))


def test_quantized_rows_reach_no_backend_that_quantizes_its_own(gen):
    """Rows quantized by their producer (`fuse_norm_quant`) at parts whose backend quantizes its
    own input: one line, whether the parts run fused or one after another."""
    from gpubake.kernels.fp8_ref import fp8_rowwise_ref
    from gpubake.kernels.layers_common import QuantizedRows

    x = torch.randn(2, 5, 64, generator=gen).to(torch.bfloat16)
    rows = QuantizedRows(*fp8_rowwise_ref(x.reshape(-1, 64)), x.shape, x.dtype, x.device)
    parts = _parts(gen)
    for p in parts:
        p.bind_backend(CpuReference())
    with pytest.raises(KernelError, match="^FusedNVFP4Projection: activations arrive quantized"):
        FusedNVFP4Projection(parts)(rows)
    parts[0].bind_backend(cpu_hopper_fp8())  # mixed: run part by part, the CPU reference still refuses
    with pytest.raises(KernelError, match="^FusedNVFP4Projection: activations arrive quantized"):
        FusedNVFP4Projection(parts)(rows)
    for p in parts:
        p.bind_backend(cpu_hopper_fp8())
    fused = FusedNVFP4Projection(parts)
    assert torch.equal(fused(rows), fused(x))  # rows quantized as hopper-fp8 would: the same output
