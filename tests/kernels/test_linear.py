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
    monkeypatch.setattr(backends.os, "environ", {})  # nothing below may look
    assert bind_backends(net, "hopper-fp8") == 2
    assert bound_backends(net) == {"hopper-fp8": 2} and net[0].backend_name == "hopper-fp8"
    with pytest.raises(KernelError, match="backend hopper-fp8 cannot run on cpu"):
        net(x)  # the binding replaced the prepared weight: the bound backend runs, or refuses
    bind_backends(net, backends.get_backend("cpu-reference"))
    calls.clear()
    assert torch.equal(net(x), y) and calls == ["cpu-reference"] * 2
