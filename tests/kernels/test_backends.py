"""Backend selection, bad input, and CPU emulations of the GPU backends' arithmetic."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels import backends
from gpubake.kernels.backends import (
    BlackwellNative,
    CpuReference,
    default_backend_name,
    get_backend,
    select_backend,
)
from gpubake.kernels.format import (
    BLOCK,
    dequantize_ref,
    e2m1_decode,
    quantize_ref,
    unpack_fp4,
    unswizzle_scales,
)
from gpubake.kernels.fp8_ref import fp8_rowwise_ref, nvfp4_to_fp8_ref
from gpubake.kernels.selfcheck import TOLERANCE


@pytest.mark.parametrize("cap,name", [(None, "cpu-reference"), ((10, 0), "blackwell-native"),
                                      ((12, 0), "blackwell-native"), ((9, 0), "hopper-fp8"),
                                      ((8, 9), "hopper-fp8"), ((8, 6), "dequant-bf16"),
                                      ((8, 0), "dequant-bf16"), ((7, 5), "dequant-bf16")])
def test_default_by_capability(cap, name):
    assert default_backend_name(cap) == name


def test_select_on_cpu_and_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert select_backend("cpu").name == "cpu-reference"
    monkeypatch.setenv(backends.ENV_VAR, "hopper-fp8")
    with pytest.raises(KernelError, match=r"hopper-fp8: needs sm_89, sm_90, but device cpu is cpu"):
        select_backend("cpu")
    monkeypatch.setenv(backends.ENV_VAR, "blackwell-native")
    with pytest.raises(KernelError, match="sm_100"):
        select_backend("cpu")
    monkeypatch.setenv(backends.ENV_VAR, "fast-please")
    with pytest.raises(KernelError, match="unknown backend 'fast-please'"):
        select_backend("cpu")


def test_capability_mismatch_names_the_gpu(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "blackwell-native")
    monkeypatch.setattr(backends, "capability", lambda dev: (9, 0))
    with pytest.raises(KernelError, match="is sm_90"):
        select_backend(torch.device("cuda", 0))


@pytest.mark.parametrize("name", ["hopper-fp8", "dequant-bf16", "blackwell-native"])
def test_gpu_backend_rejects_cpu_tensors(name):
    b = get_backend(name)
    pw = b.prepare(quantize_ref(torch.randn(32, 64)))
    with pytest.raises(KernelError, match=f"{name}: needs CUDA tensors.*cpu"):
        b.apply(torch.randn(4, 64, dtype=torch.bfloat16), pw)


def test_bad_shapes_and_dtypes():
    b = CpuReference()
    pw = b.prepare(quantize_ref(torch.randn(32, 64)))
    with pytest.raises(KernelError, match=r"\(4, 48\).*\[32, 64\]"):
        b.apply(torch.randn(4, 48), pw)
    with pytest.raises(KernelError, match="int32"):
        b.apply(torch.zeros(4, 64, dtype=torch.int32), pw)
    q = quantize_ref(torch.randn(32, 64))
    q.block_scale = q.block_scale.float()
    with pytest.raises(KernelError, match="float8_e4m3fn"):
        b.prepare(q)


def _data(shape, gen):
    x = torch.randn(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.01, x * 30, x)


def _decode(data, scale_2d):
    v = e2m1_decode(unpack_fp4(data))
    return (v.reshape(*v.shape[:-1], -1, BLOCK) * scale_2d.float().unsqueeze(-1)).reshape(v.shape)


@pytest.mark.parametrize("M,N,K", [(96, 256, 512), (7, 130, 48)])
def test_blackwell_operands_reproduce_reference(M, N, K, gen):
    """What blackwell-native hands torch._scaled_mm, decoded the way _scaled_mm defines it,
    is bit-for-bit the reference quantization of x and W, and the product matches."""
    w, x = _data((N, K), gen), _data((M, K), gen)
    qw, qx = quantize_ref(w), quantize_ref(x)
    b = BlackwellNative()
    op = b.operands(x, b.prepare(qw))
    assert torch.equal(op["a"], qx.data) and torch.equal(op["b"], qw.data)
    sa = unswizzle_scales(op["scale_a"], M, K // BLOCK)
    sb = unswizzle_scales(op["scale_b"], N, K // BLOCK)
    assert torch.equal(sa.view(torch.uint8), qx.block_scale.view(torch.uint8))
    assert torch.equal(sb.view(torch.uint8), qw.block_scale.view(torch.uint8))
    assert op["alpha"].dtype == torch.float32 and torch.equal(op["alpha"], qx.global_scale * qw.global_scale)
    A, B = _decode(op["a"], sa), _decode(op["b"], sb)
    # operands, dequantized, are bit-for-bit the reference's dequantization
    assert torch.equal(A * qx.global_scale, dequantize_ref(qx, torch.float32))
    assert torch.equal(B * qw.global_scale, dequantize_ref(qw, torch.float32))
    # _scaled_mm's algebra: sum(A * B) exactly (float64 here), times alpha afterwards
    emulated = (A.double() @ B.double().t()) * op["alpha"].double()
    ref = dequantize_ref(qx, torch.float64) @ dequantize_ref(qw, torch.float64).t()
    assert torch.allclose(emulated, ref, rtol=0, atol=1e-6 * ref.abs().max())
    # W4A4 error against the weight-only result stays within the self-test tolerance
    w4a16 = x.double() @ dequantize_ref(qw, torch.float64).t()
    err = float((emulated - w4a16).norm() / w4a16.norm())
    assert 0.03 < err < TOLERANCE["blackwell-native"] / 2  # measured 0.083-0.122 (W4A4)


def test_hopper_fp8_emulation_error_within_tolerance(gen):
    """FP8 re-expression of the weight + per-token FP8 activations, with the algebra of the
    row-wise scaled GEMM; its error over x @ dequant(W).T stays inside the self-test bound."""
    w, x = _data((256, 512), gen), _data((96, 512), gen).bfloat16()
    qw = quantize_ref(w)
    wq, ws = nvfp4_to_fp8_ref(qw)
    xq, xs = fp8_rowwise_ref(x)
    y = (xq.double() * xs.double()) @ (wq.double() * ws.double().unsqueeze(1)).t()
    ref = x.double() @ dequantize_ref(qw, torch.float64).t()
    err = float((y - ref).norm() / ref.norm())
    assert 1e-3 < err < TOLERANCE["hopper-fp8"] / 2  # measured 0.031


def test_cpu_reference_result():
    w = torch.randn(32, 64)
    q = quantize_ref(w)
    b = CpuReference()
    x = torch.randn(3, 5, 64)
    bias = torch.randn(32)
    y = b.apply(x, b.prepare(q), bias)
    assert y.shape == (3, 5, 32)
    assert torch.allclose(y, x @ dequantize_ref(q, torch.float32).t() + bias, atol=1e-5)
