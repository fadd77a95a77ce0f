"""Q, K and V as one GEMM (`FusedNVFP4Projection`) give what the three layers give: on the
CPU reference (one after another) and through hopper-fp8's `apply_fused` (its Triton
kernels in the interpreter, torch's CPU `_scaled_mm`), cached FP8 weights included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpubake.errors import KernelError
from gpubake.kernels.backends import CpuReference, HopperFp8
from gpubake.kernels.linear import FusedNVFP4Projection, NVFP4Linear


class CpuHopperFp8(HopperFp8):
    """hopper-fp8's arithmetic on the CPU (torch's CPU `_scaled_mm` takes row-wise E4M3)."""

    needs_cuda = False
    caps = None


def _parts(gen, k=64, outs=(48, 48, 32)):
    parts = []
    for n in outs:
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen)))
            lin.bias.copy_(torch.randn(n, generator=gen))
        parts.append(NVFP4Linear.from_linear(lin))
    return parts


@pytest.mark.parametrize("backend", [CpuReference(), CpuHopperFp8()])
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
