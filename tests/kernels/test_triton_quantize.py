"""The Triton quantizer is bit-identical to the reference (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels.format import quantize_ref, swizzle_scales, unswizzle_scales
from gpubake.kernels.quantize_triton import quantize


def _same(a, b):
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
    assert torch.equal(a.global_scale, b.global_scale)
    assert a.shape == b.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 512), (33, 48), (2, 3, 160), (1, 16)])
def test_bit_identical(shape, dtype, gen, spiky):
    x = spiky(shape, gen, dtype=dtype)
    if dtype == torch.float16:
        x = torch.nan_to_num(x, nan=float("nan"), posinf=float("inf"), neginf=-float("inf"))
    _same(quantize(x), quantize_ref(x))


def test_bit_identical_with_given_global_scale(gen, spiky):
    x = spiky((40, 256), gen)
    for g in (1e-3, 0.5, torch.tensor(3.0)):  # small g: most values saturate
        _same(quantize(x, g), quantize_ref(x, g))


def test_non_contiguous_input(gen, spiky):
    x = spiky((64, 128), gen)[:, :64]
    assert not x.is_contiguous()
    _same(quantize(x), quantize_ref(x))


@pytest.mark.parametrize("M,K", [(130, 80), (256, 512), (5, 16)])
def test_swizzled_scales_written_directly(M, K, gen, spiky):
    x = spiky((M, K), gen)
    a, b = quantize(x, swizzled=True), quantize_ref(x)
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.block_scale.view(torch.uint8), swizzle_scales(b.block_scale).view(torch.uint8))
    assert torch.equal(unswizzle_scales(a.block_scale, M, K // 16).view(torch.uint8),
                       b.block_scale.view(torch.uint8))


def test_errors(monkeypatch):
    with pytest.raises(KernelError, match=r"\(3, 40\)"):
        quantize(torch.zeros(3, 40))
    with pytest.raises(KernelError, match="int8"):
        quantize(torch.zeros(3, 32, dtype=torch.int8))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="CUDA tensor.*device cpu"):
        quantize(torch.zeros(3, 32))


def test_bf16_at_odd_offset_takes_the_generic_path(gen, spiky):
    x = spiky((8, 65), gen, dtype=torch.bfloat16, specials=False).reshape(-1)[1:513].reshape(8, 64)
    assert x.data_ptr() % 4 == 2
    _same(quantize(x), quantize_ref(x))


def test_every_bf16_value_in_range_rounds_like_the_reference():
    """Blocks of 15 bf16 values + 6.0 with global scale 1: block scale 1, so every value is
    coded as it is: exhaustive over the E2M1 range, ties included."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.bfloat16)
    v = v[torch.isfinite(v.float()) & (v.float().abs() <= 6)]
    v = torch.cat([v, torch.zeros(15 - len(v) % 15, dtype=torch.bfloat16)]).reshape(-1, 15)
    x = torch.cat([v, torch.full((len(v), 1), 6.0, dtype=torch.bfloat16)], dim=1)
    ref = quantize_ref(x, 1.0)
    assert (ref.block_scale.float() == 1).all()
    _same(quantize(x, 1.0), ref)
