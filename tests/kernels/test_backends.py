"""Backend selection, bad input, and CPU emulations of the GPU backends' arithmetic."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels import backends
from gpubake.kernels.backends import (
    BlackwellNative,
    CpuReference,
    DequantBf16,
    HopperFp8,
    default_backend_name,
    get_backend,
    select_backend,
)
from gpubake.kernels.format import (
    BLOCK,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_NORMAL,
    amax_finite,
    dequantize_ref,
    e2m1_decode,
    e2m1_encode,
    global_scale_from_amax,
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


# ------------------------------------------------------- static activation scales (issue 14)
#
# Published W4A4 checkpoints (LightX2V) calibrate one activation scale per layer. LightX2V
# (ModelTC/LightX2V f8aee98) quantizes the activation with it and scales the GEMM's output
# by alpha: lightx2v/common/ops/mm/mm_weight.py:641-644 (act_quant_nvfp4 ->
# scaled_nvfp4_quant(x, self.input_global_scale)), 1238-1248 (apply ->
# cutlass_scaled_nvfp4_mm(..., alpha=self.alpha)), 1042-1066 (input_global_scale =
# 2688 / input_absmax, alpha = 1 / (input_global_scale * weight_global_scale));
# lightx2v_kernel/python/lightx2v_kernel/gemm.py:4-8 and 11-55 (the two ops). gpubake stores
# the inverse, g = amax / 2688 (format.INPUT_GLOBAL_SCALE_KEY), so alpha = g_a * g_w.


def _calibrated_scale(shape, gen):
    """A static activation global scale, calibrated (amax / 2688) on another draw of the data."""
    return global_scale_from_amax(amax_finite(_data(shape, gen)))


@pytest.mark.parametrize("M,N,K", [(96, 256, 512), (7, 130, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blackwell_static_scale_operands_reproduce_reference(M, N, K, dtype, gen, monkeypatch):
    """With a static scale the activation operand is `quantize_ref(x, g_static)` bit for bit,
    alpha is g_static * g_w, the per-call amax pass does not run, and the product matches."""
    from gpubake.kernels import quantize_triton

    w, x = _data((N, K), gen), _data((M, K), gen).to(dtype)
    g = _calibrated_scale((M, K), gen)
    qw, qx = quantize_ref(w), quantize_ref(x, g)
    b = BlackwellNative()
    pw = b.prepare(qw, g)
    dynamic = b.operands(x, b.prepare(qw))

    def no_amax(*a, **k):
        raise AssertionError("a static scale must not compute the activations' amax")

    monkeypatch.setattr(quantize_triton, "device_global_scale", no_amax)
    op = b.operands(x, pw)
    assert torch.equal(op["a"], qx.data) and torch.equal(op["b"], qw.data)
    sa = unswizzle_scales(op["scale_a"], M, K // BLOCK)
    assert torch.equal(sa.view(torch.uint8), qx.block_scale.view(torch.uint8))
    assert op["alpha"].dtype == torch.float32 and torch.equal(op["alpha"], g * qw.global_scale)
    assert not torch.equal(op["alpha"], dynamic["alpha"])  # the static scale, not the data's amax
    A = _decode(op["a"], sa)
    assert torch.equal(A * g, dequantize_ref(qx, torch.float32))
    B = _decode(op["b"], unswizzle_scales(op["scale_b"], N, K // BLOCK))
    emulated = (A.double() @ B.double().t()) * op["alpha"].double()
    ref = dequantize_ref(qx, torch.float64) @ dequantize_ref(qw, torch.float64).t()
    assert torch.allclose(emulated, ref, rtol=0, atol=1e-6 * ref.abs().max())
    w4a16 = x.double() @ dequantize_ref(qw, torch.float64).t()
    err = float((emulated - w4a16).norm() / w4a16.norm())
    assert 0.03 < err < TOLERANCE["blackwell-native"]  # measured 0.086-0.16, as the dynamic scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_scale_saturates_beyond_the_calibrated_amax(dtype):
    """Values past 6 * 448 * g (the calibrated amax) saturate: block scale 448 (byte 0x7E),
    element +-6, so they dequantize to +-6 * 448 * g; their block's other values are coded
    against scale 448; blocks within range are untouched; NaN and inf keep their rules.
    A dynamic scale of the same data does not saturate."""
    amax = 96.0
    g = global_scale_from_amax(torch.tensor(amax))
    x = torch.linspace(-40, 40, 8 * BLOCK).reshape(2, 4 * BLOCK)  # in range
    x[0, 3] = 4 * amax           # block (0, 0): far beyond
    x[0, 17] = -1.05 * amax      # block (0, 1): just beyond
    x[1, 40] = float("inf")      # block (1, 2)
    x[1, 60] = float("nan")      # block (1, 3)
    x = x.to(dtype)
    xf = x.float()
    b = BlackwellNative()
    op = b.operands(x, b.prepare(quantize_ref(torch.randn(8, 4 * BLOCK)), g))
    q = quantize_ref(x, g)
    assert torch.equal(op["a"], q.data)
    assert torch.equal(unswizzle_scales(op["scale_a"], 2, 4).view(torch.uint8), q.block_scale.view(torch.uint8))
    sbytes = q.block_scale.view(torch.uint8)
    assert sbytes[0, 0] == sbytes[0, 1] == sbytes[1, 2] == 0x7E  # 448
    assert sbytes[1, 3] == 0x7F                                 # NaN block
    codes = unpack_fp4(q.data)
    assert codes[0, 3] == 0x7 and codes[0, 17] == 0xF and codes[1, 40] == 0x7  # +6, -6, +6
    deq = dequantize_ref(q, torch.float32)
    top = (torch.tensor(E2M1_MAX * E4M3_MAX) * g).item()
    assert deq[0, 3] == top and deq[0, 17] == -top and deq[1, 40] == top
    assert top == pytest.approx(amax, rel=1e-6)
    assert torch.isnan(deq[1, 48:64]).all()
    # the rest of a saturated block is coded against scale 448: |error| <= half a step there
    inside = torch.ones(BLOCK, dtype=torch.bool)
    inside[3] = False
    step = 448 * float(g)  # e2m1 spacing at most 2 (between 4 and 6), times the block scale
    assert (deq[0, :BLOCK][inside] - xf[0, :BLOCK][inside]).abs().max() <= step
    # blocks within range: exactly what the same global scale gives them alone
    alone = quantize_ref(x[0:1, 2 * BLOCK:], g)
    assert torch.equal(q.data[0:1, BLOCK:], alone.data)
    # the dynamic scale covers the outlier instead
    qd = quantize_ref(x)
    assert dequantize_ref(qd, torch.float32)[0, 3] == pytest.approx(4 * amax, rel=0.1)


def _lightx2v_quant(x, input_global_scale):
    """LightX2V's NVFP4 activation quantization, restated from its kernel
    (lightx2v_kernel/csrc/gemm/nvfp4_quant_kernels_sm120.cu @ f8aee98): line 264 reads the
    scale, line 194 ``SFValue = SFScaleVal * (vecMax * (1/6))``, line 205 rounds it to E4M3
    (satfinite: <= 448), line 216 ``outputScale = SFScaleVal * rcp(SFValue)`` (an exact
    reciprocal here, the kernel's is approximate), then ``cvt.rn.satfinite.e2m1x2``
    (lines 54-57: nearest-even, clamped to +-6). Returns (codes, scale bytes)."""
    xf = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    sf = input_global_scale * (xf.abs().amax(-1) * torch.tensor(1 / 6, dtype=torch.float32))
    sf = torch.clamp(sf, max=E4M3_MAX).to(torch.float8_e4m3fn)
    sfd = sf.float()
    out = torch.where(sfd != 0, input_global_scale * (1.0 / sfd), torch.zeros(()))
    codes = e2m1_encode(torch.clamp(xf * out.unsqueeze(-1), -E2M1_MAX, E2M1_MAX))
    return codes.reshape(x.shape), sf.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_scale_matches_lightx2v_arithmetic(dtype, gen):
    """gpubake's static scale g = 1 / LightX2V's input_global_scale gives LightX2V's codes and
    block scales on data with outliers past the calibrated amax (scales >= 2**-6 here: the
    one documented difference is the 2**-6 floor of gpubake's block scale)."""
    x = _data((256, 1024), gen).to(dtype)
    amax = amax_finite(_data((256, 1024), gen))  # calibration set
    igs = (2688.0 / amax).float()                # LightX2V's convention
    g = (1.0 / igs).float()                      # gpubake's (what the importer stores)
    codes, sf = _lightx2v_quant(x, igs)
    assert amax < amax_finite(x) and (sf == 0x7E).any()  # some blocks do saturate
    assert (sf.view(torch.float8_e4m3fn).float() >= E4M3_MIN_NORMAL).all()
    b = BlackwellNative()
    op = b.operands(x, b.prepare(quantize_ref(torch.randn(8, 1024)), g))
    assert torch.equal(unpack_fp4(op["a"]), codes)
    assert torch.equal(unswizzle_scales(op["scale_a"], 256, 1024 // BLOCK).view(torch.uint8), sf)


class _OnCpu:
    """A GPU backend's class with its CUDA check lifted: its Triton kernels run under the
    interpreter and `torch._scaled_mm` on the CPU, arithmetic unchanged."""

    needs_cuda = False


@pytest.mark.parametrize("cls", [CpuReference, DequantBf16, HopperFp8])
def test_backends_that_do_not_quantize_to_nvfp4_ignore_the_static_scale(cls, gen):
    """W4A16 (cpu-reference, dequant-bf16) and per-token FP8 (hopper-fp8): a static NVFP4
    activation scale, even an absurd one, changes nothing in their output."""
    assert cls.uses_static_input_scale is False and BlackwellNative.uses_static_input_scale is True
    b = type(cls.__name__, (_OnCpu, cls), {})()
    w, x = _data((48, 64), gen), _data((5, 64), gen).bfloat16()
    q, bias = quantize_ref(w), torch.randn(48, generator=gen).bfloat16()
    y = b.apply(x, b.prepare(q), bias)
    for g in (_calibrated_scale((5, 64), gen), torch.tensor(2.0**-100)):
        pw = b.prepare(q, g)
        assert pw.input_global_scale is not None
        assert torch.equal(b.apply(x, pw, bias), y)
    assert torch.isfinite(y).all()


def test_static_scale_must_be_one_float32_value():
    b = BlackwellNative()
    q = quantize_ref(torch.randn(8, 32))
    with pytest.raises(KernelError, match=r"static input global scale must be one float32 value, got torch.float16 \[\]"):
        b.prepare(q, torch.tensor(0.01, dtype=torch.float16))
    with pytest.raises(KernelError, match=r"got torch.float32 \[2\]"):
        b.prepare(q, torch.tensor([0.01, 0.02]))
    assert b.prepare(q, torch.tensor([0.01])).input_global_scale.shape == ()
