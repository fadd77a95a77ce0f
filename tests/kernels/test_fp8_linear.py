"""FP8-weight linears (`kernels.fp8_linear`): the reference quantization, the three GEMM paths
against it, scaled-mm bit for bit against a float64 emulation, dtypes under a model-wide cast,
the state dict, binding, bad shapes, and the boot check (`selfcheck.fp8_selfcheck`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpubake.errors import KernelError
from gpubake.kernels import archs
from gpubake.kernels.fp8_linear import (
    FP8_BACKENDS,
    FP8_SCALE_KEY,
    FP8_WEIGHT_KEY,
    FP8Linear,
    bind_fp8_backends,
    bound_fp8_backends,
    default_fp8_backend,
    dequantize_fp8,
    quantize_fp8_rowwise,
    select_fp8_backend,
)
from gpubake.kernels.format import MIN_GLOBAL_SCALE
from gpubake.kernels.selfcheck import FP8_TOLERANCE, fp8_selfcheck


def _linear(n: int = 64, k: int = 96, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# ------------------------------------------------------------------ reference quantization


def test_round_trip_error_is_within_half_an_e4m3_step_per_element():
    w = torch.randn(32, 80) * torch.logspace(-3, 2, 32).unsqueeze(1)  # rows of very different sizes
    q, s = quantize_fp8_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (32, 1)
    assert torch.allclose(s, w.abs().amax(1, keepdim=True) / 448)
    back = dequantize_fp8(q, s)
    # E4M3 has 3 mantissa bits: relative step 2**-3, so rounding error <= 2**-4 of the value
    # for normal values, and <= half the subnormal step (2**-10 * scale) below 2**-6 * scale
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    assert (q.float().abs().amax(1) == 448).all()  # each row's max maps to E4M3's largest value
    assert torch.allclose(back.abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)


def test_saturation_zero_rows_and_nan():
    w = torch.tensor([[1.0, -2.0, float("inf"), float("-inf")],
                      [0.0, -0.0, 0.0, 0.0],
                      [1.0, float("nan"), 3.0, -4.0]])
    q, s = quantize_fp8_rowwise(w)
    assert float(s[0]) == float(torch.tensor(2.0) / 448) and q[0, 2].float() == 448 and q[0, 3].float() == -448  # inf saturates
    assert float(s[1]) == MIN_GLOBAL_SCALE and (q[1].float() == 0).all()  # zero row: floor scale, codes 0
    assert q.view(torch.uint8)[1, 1] == 0x80  # -0 stays -0
    assert float(s[2]) == float(torch.tensor(4.0) / 448)  # NaN is not the row's amax
    assert q.view(torch.uint8)[2, 1] == 0x7F and torch.isnan(q[2, 1].float())  # one canonical NaN
    assert torch.allclose(q[2, [0, 2, 3]].float() * s[2], torch.tensor([1.0, 3.0, -4.0]), rtol=2**-4)
    with pytest.raises(KernelError, match="need 2-D"):
        quantize_fp8_rowwise(torch.zeros(4))


def test_bf16_and_fp32_sources_quantize_alike():
    w = torch.randn(16, 48).bfloat16()
    a, sa = quantize_fp8_rowwise(w)
    b, sb = quantize_fp8_rowwise(w.float())
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)


# ------------------------------------------------------------------ the paths


@pytest.mark.parametrize("backend, tol", [("scaled-mm", 4e-2), ("dequant-bf16", 6e-3), ("reference", 1e-6)])
def test_each_path_matches_the_float32_reference(backend, tol):
    lin = _linear()
    layer = FP8Linear.from_linear(lin, backend=backend)
    x = torch.randn(3, 5, 96)
    if backend != "reference":
        x = x.bfloat16()
    ref = x.float() @ layer.dequantized().t() + lin.bias.float()
    y = layer(x)
    assert y.shape == (3, 5, 64) and y.dtype == x.dtype
    assert _rel(y, ref) < tol
    # and the format is close to the BF16 linear it came from (E4M3 weights: ~2 %)
    assert _rel(y, lin(x.bfloat16())) < 6e-2


def test_scaled_mm_is_bit_exact_against_a_float64_emulation():
    """Values on a grid where float32 accumulation is exact (small integers, power-of-two
    scales): the CPU `_scaled_mm` output equals the float64 product rounded once to bf16."""
    torch.manual_seed(1)
    w = torch.randint(-8, 9, (32, 64)).float()
    # E4M3-exact weights (integers of at most 3 significant bits) and power-of-two row scales
    layer = FP8Linear(64, 32, bias=True, backend="scaled-mm")
    scale = 2.0 ** torch.randint(-4, 4, (32, 1)).float()
    layer.load_fp8(w.to(torch.float8_e4m3fn), scale)
    layer.bias.copy_(torch.randint(-4, 5, (32,)).bfloat16())
    x = torch.randint(-7, 8, (16, 64)).bfloat16()
    x[:, 0] = 7.0  # per-token scale 7/448 = 1/64: x / scale exact, integers times 64 are E4M3-exact
    y = layer(x)
    xs = 7.0 / 448
    emulated = (x.double() / xs).round() * xs @ (w.double() * scale.double()).t() + layer.bias.double()
    assert torch.equal(y, emulated.to(torch.bfloat16))


def test_scaled_mm_uses_the_reference_activation_quantization():
    from gpubake.kernels.fp8_ref import fp8_rowwise_ref

    layer = FP8Linear.from_linear(_linear(bias=False), backend="scaled-mm")
    x = torch.randn(7, 96).bfloat16()
    xq, xs = fp8_rowwise_ref(x)
    want = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=layer.weight_scale.view(1, -1),
                            out_dtype=torch.bfloat16, use_fast_accum=True)
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("backend", ["scaled-mm", "dequant-bf16", "reference"])
def test_an_input_gelu_is_the_layer_of_the_gelu(backend):
    """`input_activation`: what the FFN's GELU module did before the layer, inside the layer (in
    scaled-mm's activation quantization, else just before the GEMM): the same output on the CPU."""
    layer = FP8Linear.from_linear(_linear(k=96), backend=backend)
    x = (torch.randn(7, 96) * 2).bfloat16()
    want = layer(torch.nn.functional.gelu(x, approximate="tanh"))
    layer.input_activation = "gelu_tanh"
    assert torch.equal(layer(x), want)
    assert layer.backend(x.device).fuses_input_gelu == (backend == "scaled-mm")


def test_bad_shapes_and_dtypes_are_kernel_errors():
    layer = FP8Linear(96, 64)
    with pytest.raises(KernelError, match=r"activations shape \(2, 95\)"):
        layer(torch.randn(2, 95))
    with pytest.raises(KernelError, match="activations dtype torch.int32"):
        layer(torch.zeros(2, 96, dtype=torch.int32))
    with pytest.raises(KernelError, match=r"weight \(64, 95\)"):
        layer.load_fp8(torch.zeros(64, 95, dtype=torch.float8_e4m3fn), torch.ones(64, 1))
    with pytest.raises(KernelError, match="need float8_e4m3fn and float32"):
        layer.load_fp8(torch.zeros(64, 96, dtype=torch.bfloat16), torch.ones(64, 1))
    ragged = FP8Linear(40, 24, backend="scaled-mm")
    with pytest.raises(KernelError, match="multiples of 16"):
        ragged(torch.randn(2, 40).bfloat16())
    with pytest.raises(KernelError, match="empty"):
        FP8Linear(0, 8)


# ------------------------------------------------------------------ the module


def test_dtypes_survive_a_model_wide_cast_and_the_bias_follows():
    model = nn.Sequential(FP8Linear.from_linear(_linear().float()), nn.LayerNorm(64))
    model.to(torch.bfloat16)
    layer = model[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and model[1].weight.dtype == torch.bfloat16
    model.half()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16


def test_state_dict_round_trip_keys_and_dtypes():
    src = FP8Linear.from_linear(_linear())
    sd = src.state_dict()
    assert set(sd) == {FP8_WEIGHT_KEY, FP8_SCALE_KEY, "bias"}
    assert (sd["weight"].dtype, sd["weight_scale"].dtype, tuple(sd["weight_scale"].shape)) == \
        (torch.float8_e4m3fn, torch.float32, (64, 1))
    dst = FP8Linear(96, 64)
    dst.load_state_dict(sd)
    x = torch.randn(4, 96).bfloat16()
    assert torch.equal(dst(x), src(x))
    assert set(FP8Linear(96, 64, bias=False).state_dict()) == {"weight", "weight_scale"}
    with pytest.raises(RuntimeError, match="weight_scale"):
        FP8Linear(96, 64).load_state_dict({**sd, "weight_scale": torch.ones(64)})


def test_bind_and_bound_counts():
    model = nn.Sequential(FP8Linear(32, 16), nn.Linear(16, 16), FP8Linear(16, 16, bias=False))
    assert bound_fp8_backends(model) == {"default": 2}
    assert bind_fp8_backends(model, "reference") == 2
    assert bound_fp8_backends(model) == {"reference": 2}
    model[0].bind_backend("scaled-mm")
    assert bound_fp8_backends(model) == {"scaled-mm": 1, "reference": 1}
    with pytest.raises(KernelError, match="unknown backend 'fast'"):
        bind_fp8_backends(model, "fast")


def test_default_and_override_by_device(monkeypatch):
    monkeypatch.delenv("GPUBAKE_FP8_BACKEND", raising=False)
    assert default_fp8_backend("cpu") == "reference" == select_fp8_backend("cpu")
    for cap, want in (((8, 0), "dequant-bf16"), ((8, 6), "dequant-bf16"), ((8, 9), "scaled-mm"),
                      ((9, 0), "scaled-mm"), ((10, 0), "scaled-mm"), ((12, 0), "scaled-mm"), ((7, 5), "dequant-bf16")):
        assert archs.arch_for(cap).fp8_backend == want
    assert FP8_BACKENDS["scaled-mm"].caps == ((8, 9), (9, 0), (10, 0), (12, 0))
    assert not FP8_BACKENDS["scaled-mm"].supports_capability((8, 0))
    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "scaled-mm")
    assert select_fp8_backend("cpu") == "scaled-mm"
    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "bogus")
    with pytest.raises(KernelError, match="^GPUBAKE_FP8_BACKEND: unknown backend 'bogus'"):
        select_fp8_backend("cpu")


def test_forward_reads_no_environment(monkeypatch):
    layer = FP8Linear.from_linear(_linear())
    x = torch.randn(2, 96).bfloat16()
    before = layer(x)
    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "scaled-mm")
    assert torch.equal(layer(x), before)  # unbound: the CPU's default (reference) still runs


def test_a_new_binding_after_a_forward_runs_from_the_next_forward():
    """The path is resolved once per device (not on every forward), and a binding replaces it."""
    layer = FP8Linear.from_linear(_linear())
    x = torch.randn(4, 96).bfloat16()
    w, scale, bias = layer.weight, layer.weight_scale, layer.bias
    assert torch.equal(layer(x), FP8_BACKENDS["reference"].apply(x, w, scale, bias))
    layer.bind_backend("dequant-bf16")
    assert torch.equal(layer(x), FP8_BACKENDS["dequant-bf16"].apply(x, w, scale, bias))
    assert not torch.equal(FP8_BACKENDS["dequant-bf16"].apply(x, w, scale, bias),
                           FP8_BACKENDS["reference"].apply(x, w, scale, bias))  # the two paths differ here


# ------------------------------------------------------------------ the boot check


@pytest.mark.parametrize("backend", list(FP8_BACKENDS))
def test_fp8_selfcheck_passes_on_the_cpu(backend):
    res = fp8_selfcheck(backend, "cpu")
    assert res["ok"], res
    assert res["tolerance"] == FP8_TOLERANCE[backend] and res["max_rel_error"] <= res["tolerance"]
    assert 0.01 < res["source_rel_error"] < 0.05  # the format's own E4M3 weight error


def test_fp8_selfcheck_fails_a_broken_path(monkeypatch):
    monkeypatch.setattr(FP8_BACKENDS["scaled-mm"], "apply", lambda x, w, s, b: torch.zeros(*x.shape[:-1], w.shape[0]))
    res = fp8_selfcheck("scaled-mm", "cpu")
    assert not res["ok"] and "relative error" in res["reason"]
    res = fp8_selfcheck("nope", "cpu")
    assert not res["ok"] and "unknown backend" in res["reason"]
