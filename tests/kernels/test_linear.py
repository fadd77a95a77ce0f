"""NVFP4Linear: nn.Linear drop-in, state dict contract, CPU forward; selfcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpubake.errors import KernelError
from gpubake.kernels.format import dequantize_ref
from gpubake.kernels.linear import NVFP4Linear
from gpubake.kernels.selfcheck import selfcheck


def test_from_linear_forward_matches_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m = NVFP4Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = x @ dequantize_ref(m.nvfp4_weight(), torch.float32).t() + lin.bias
        y = m(x)
        assert y.shape == (2, 5, 48) and y.dtype == x.dtype
        assert torch.allclose(y, ref, atol=1e-5)
        rel = (y - lin(x)).norm() / lin(x).norm()
    assert 0.01 < rel < 0.2  # it really is 4-bit


def test_state_dict_contract_and_roundtrip():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    m = NVFP4Linear.from_linear(lin)
    sd = m.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "weight_packed": (torch.uint8, (16, 16)),
        "weight_scale": (torch.float8_e4m3fn, (16, 2)),
        "weight_global_scale": (torch.float32, ()),
        "bias": (torch.bfloat16, (16,)),
    }
    m2 = NVFP4Linear(32, 16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    before = m2(x)  # builds the prepared-weight cache ...
    m2.load_state_dict(sd)  # ... which loading must drop
    assert not torch.equal(before, m2(x))
    assert torch.equal(m2(x), m(x))


def test_no_bias_and_nested_keys():
    net = nn.Sequential(NVFP4Linear(16, 8, bias=False))
    assert set(net.state_dict()) == {"0.weight_packed", "0.weight_scale", "0.weight_global_scale"}
    assert net(torch.randn(2, 16, dtype=torch.bfloat16)).shape == (2, 8)


def test_bad_input():
    with pytest.raises(KernelError, match="in_features=40"):
        NVFP4Linear(40, 8)
    m = NVFP4Linear(32, 8)
    with pytest.raises(KernelError, match=r"\(2, 16\)"):
        m(torch.randn(2, 16))
    with pytest.raises(KernelError, match="cannot run on cpu"):
        NVFP4Linear(32, 8, backend="hopper-fp8")(torch.randn(2, 32))


def test_selfcheck_cpu():
    r = selfcheck("cpu")
    assert r["ok"] is True and r["backend"] == "cpu-reference"
    assert r["quantizer_bit_exact"] is True
    assert 0 <= r["max_rel_error"] <= r["tolerance"]
    assert set(r) == {"backend", "device", "ok", "quantizer_bit_exact", "max_rel_error", "tolerance", "seconds"}


def test_model_wide_dtype_cast_keeps_the_format():
    m = NVFP4Linear.from_linear(nn.Linear(32, 8))
    x = torch.randn(3, 32)
    y = m(x)
    g = m.weight_global_scale.clone()
    m.to(torch.float16)  # what a pipeline's .to(dtype) does to every module
    assert m.weight_scale.dtype == torch.float8_e4m3fn
    assert m.weight_global_scale.dtype == torch.float32 and torch.equal(m.weight_global_scale, g)
    assert m.weight_packed.dtype == torch.uint8 and m.bias.dtype == torch.float16
    y16 = m(x.half())
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.float(), y, atol=1e-2, rtol=1e-2)


def test_forward_runs_the_bound_backend_and_never_reads_the_environment(monkeypatch):
    """Bound once (the runtime plan does it with the backend it resolved); a forward reads no
    $GPUBAKE_NVFP4_BACKEND: an unbound layer runs its device's default from the arch table."""
    from gpubake.kernels import backends
    from gpubake.kernels.linear import bind_backends, bound_backends

    calls: list[str] = []
    real = backends.CpuReference.apply

    def spy(self, x, pw, bias=None):
        calls.append(self.name)
        return real(self, x, pw, bias)

    monkeypatch.setattr(backends.CpuReference, "apply", spy)
    monkeypatch.setenv(backends.ENV_VAR, "hopper-fp8")  # cannot run on the CPU: read, it would raise
    net = nn.Sequential(NVFP4Linear.from_linear(nn.Linear(32, 16)), NVFP4Linear.from_linear(nn.Linear(16, 8)))
    x = torch.randn(3, 32)
    assert bound_backends(net) == {"default": 2}
    y = net(x)
    assert calls == ["cpu-reference"] * 2
    from gpubake import envs

    monkeypatch.setattr(envs.os, "environ", {})  # nothing below may look (every read goes through envs)
    assert bind_backends(net, "hopper-fp8") == 2
    assert bound_backends(net) == {"hopper-fp8": 2} and net[0].backend_name == "hopper-fp8"
    with pytest.raises(KernelError, match="backend hopper-fp8 cannot run on cpu"):
        net(x)  # the binding replaced the prepared weight: the bound backend runs, or refuses
    bind_backends(net, backends.get_backend("cpu-reference"))
    calls.clear()
    assert torch.equal(net(x), y) and calls == ["cpu-reference"] * 2


# ------------------------------------------------------- static activation scale (issue 14)

def _static_layer(g=0.02, **kw):
    torch.manual_seed(1)
    return NVFP4Linear.from_linear(nn.Linear(64, 48), input_global_scale=g, **kw)


def test_static_scale_is_an_optional_state_dict_key():
    """`P.input_global_scale`: absent by default, a float32 [] when the layer has one; a
    fresh layer loads it from a state dict that holds it, keeps it through a dtype cast."""
    from gpubake.kernels.format import INPUT_GLOBAL_SCALE_KEY

    assert INPUT_GLOBAL_SCALE_KEY == "input_global_scale"
    plain = NVFP4Linear.from_linear(nn.Linear(64, 48))
    assert plain.input_global_scale is None and INPUT_GLOBAL_SCALE_KEY not in plain.state_dict()
    m = _static_layer()
    sd = m.state_dict()
    assert sd["input_global_scale"].dtype == torch.float32 and sd["input_global_scale"].shape == ()
    assert float(sd["input_global_scale"]) == pytest.approx(0.02)
    net = nn.Sequential(NVFP4Linear(64, 48))
    net.load_state_dict({f"0.{k}": v for k, v in sd.items()})  # strict: the key is expected
    assert torch.equal(net[0].input_global_scale, sd["input_global_scale"])
    assert "static_input_scale=True" in repr(net)
    net.to(torch.bfloat16)
    assert net[0].input_global_scale.dtype == torch.float32
    built = NVFP4Linear(64, 48, static_input_scale=True)  # what the loader builds (on meta)
    with pytest.raises(RuntimeError, match="Missing key.*input_global_scale"):
        built.load_state_dict(plain.state_dict())
    m.set_input_global_scale(None)
    assert m.input_global_scale is None and set(m.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize(("value", "pattern"), [
    (torch.tensor(0.0), r"0\.0 must be finite and >= 2\*\*-120"),
    (torch.tensor(float("inf")), "inf must be finite"),
    (torch.tensor(float("nan")), "nan must be finite"),
    (torch.tensor(0.02, dtype=torch.bfloat16), r"expected a float32 scalar \(shape \[\]\), got torch.bfloat16 \[\]"),
    (torch.tensor([0.02]), r"got torch.float32 \[1\]"),
])
def test_bad_static_scale_in_a_state_dict_names_the_key(value, pattern):
    sd = {f"blk.0.{k}": v for k, v in _static_layer().state_dict().items()}
    sd["blk.0.input_global_scale"] = value
    net = nn.Sequential()
    net.add_module("blk", nn.Sequential(NVFP4Linear(64, 48)))
    with pytest.raises(KernelError, match=r"^blk\.0\.input_global_scale: .*" + pattern) as exc:
        net.load_state_dict(sd)
    assert "\n" not in str(exc.value)
    assert net.blk[0].input_global_scale is None  # nothing half-loaded
    with pytest.raises(KernelError, match="input_global_scale"):
        NVFP4Linear(64, 48).set_input_global_scale(0.0)


@pytest.mark.parametrize("backend", ["cpu-reference", "dequant-bf16"])
def test_static_scale_changes_nothing_where_activations_are_not_nvfp4(backend, monkeypatch):
    """cpu-reference and dequant-bf16 (the latter with its CUDA check lifted: Triton under
    the interpreter) compute W4A16: the layer with a static scale gives the same output."""
    from gpubake.kernels import backends

    monkeypatch.setattr(backends.DequantBf16, "needs_cuda", False)
    m = _static_layer(backend=backend)
    x = torch.randn(3, 5, 64).bfloat16()
    with torch.no_grad():
        y = m(x)
        m.set_input_global_scale(None)
        assert torch.equal(m(x), y)
        assert torch.isfinite(y).all() and y.shape == (3, 5, 48)


def test_static_scale_drives_the_native_backend_through_the_layer(emulated_blackwell):
    """The layer hands its static scale to blackwell-native (emulated on the CPU): the output
    is the GEMM of `quantize_ref(x, g_static)`, not of the dynamic quantization; a new value
    (set or loaded) replaces the prepared weight."""
    from gpubake.kernels.format import quantize_ref

    m = _static_layer(g=0.004)
    m.bind_backend(emulated_blackwell)
    x = torch.randn(2, 7, 64).bfloat16() * 3
    x[0, 0, 5] = 50.0  # beyond the calibrated amax (0.004 * 2688 = 10.75): saturates

    def expect(g):
        qx = quantize_ref(x, g)
        a = dequantize_ref(qx, torch.float64)
        return (a @ dequantize_ref(m.nvfp4_weight(), torch.float64).t() + m.bias.double()).to(x.dtype)

    with torch.no_grad():
        y = m(x)
        assert torch.allclose(y.float(), expect(m.input_global_scale).float(), rtol=1e-2, atol=1e-2)
        m.set_input_global_scale(None)
        y_dyn = m(x)
        assert torch.allclose(y_dyn.float(), expect(None).float(), rtol=1e-2, atol=1e-2)
        assert (y_dyn[0, 0] - y[0, 0]).abs().max() > 1.0  # the outlier is clipped only with the static scale
        sd = _static_layer(g=0.05).state_dict()
        m.load_state_dict(sd)
        assert torch.allclose(m(x).float(), expect(torch.tensor(0.05)).float(), rtol=1e-2, atol=1e-2)


def test_selfcheck_checks_the_static_scale_on_the_native_backend(monkeypatch, emulated_blackwell):
    """On blackwell-native (emulated on the CPU) the self-check also runs each GEMM with a
    calibrated static scale and fails when that path is wrong."""
    from gpubake.kernels import selfcheck as sc
    from gpubake.kernels.backends import BlackwellNative

    monkeypatch.setattr(sc, "select_backend", lambda dev: emulated_blackwell)
    r = sc.selfcheck("cpu")
    assert r["ok"] is True and r["backend"] == "blackwell-native"
    assert 0.03 < r["static_scale_max_rel_error"] <= r["tolerance"]  # measured 0.147 (ragged shape)
    assert 0.03 < r["max_rel_error"] <= r["tolerance"]

    class WrongStatic(type(emulated_blackwell)):
        def prepare(self, w, input_global_scale=None):  # a scale 1000x too small: everything saturates
            g = None if input_global_scale is None else input_global_scale / 1000
            return BlackwellNative.prepare(self, w, g)

    monkeypatch.setattr(sc, "select_backend", lambda dev: WrongStatic())
    bad = sc.selfcheck("cpu")
    assert bad["ok"] is False and bad["static_scale_max_rel_error"] > 0.5
    assert bad["max_rel_error"] == r["max_rel_error"]


@pytest.mark.parametrize("backend", ["cpu-reference", "dequant-bf16", "hopper-fp8"])
def test_an_input_gelu_is_the_layer_of_the_gelu(backend, monkeypatch):
    """`input_activation` (the runtime plan's `fuse_ffn_gelu`): what diffusers' FFN GELU did
    before the layer, inside it: hopper-fp8 computes it in its activation quantization (its CUDA
    check lifted: the quantization's CPU twin, the re-expression under the interpreter), the
    others just before their GEMM; on the CPU the same output bit for bit."""
    from gpubake.kernels import backends

    for cls in (backends.DequantBf16, backends.HopperFp8):
        monkeypatch.setattr(cls, "needs_cuda", False)
    torch.manual_seed(3)
    m = NVFP4Linear.from_linear(nn.Linear(64, 48).bfloat16(), backend=backend)
    x = (torch.randn(3, 5, 64) * 2).bfloat16()
    calls = []
    real_apply = m.backend(x.device).apply
    monkeypatch.setattr(m.backend(x.device), "apply", lambda *a, **kw: calls.append(kw) or real_apply(*a, **kw))
    with torch.no_grad():
        want = m(torch.nn.functional.gelu(x, approximate="tanh"))
        m.input_activation = "gelu_tanh"
        got = m(x)
    assert torch.equal(got, want)
    assert calls[-1] == ({"input_gelu": True} if backend == "hopper-fp8" else {})  # fused only where the backend does
