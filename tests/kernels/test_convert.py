"""FP8 / bf16 re-expression kernels equal their plain-torch references bit for bit."""

from __future__ import annotations

import pytest
import torch

from gpubake.kernels.convert_triton import fp8_rowwise, nvfp4_to_bf16, nvfp4_to_fp8
from gpubake.kernels.format import dequantize_ref, quantize_ref
from gpubake.kernels.fp8_ref import canonical_nan_e4m3, fp8_rowwise_ref, nvfp4_to_fp8_ref


def _bytes(t):
    return t.view(torch.uint8)


def test_fp8_rowwise_matches_torch_cast_including_subnormals_and_ties(gen):
    v = torch.randn(64, 512, generator=gen) * torch.exp(torch.randn(64, 512, generator=gen) * 4)
    v = v.clamp(-440, 440)
    v[:, 0] = 448.0  # row scale 1: values are encoded as they are
    v[0, 1:9] = torch.tensor([1.0625, 1.1875, 3 * 2.0**-11, 2.0**-10, 2.0**-6 - 2.0**-12, -0.0, 1e-30, 5 * 2.0**-11])
    v[1, 3], v[2, 4], v[3, 5] = float("nan"), float("inf"), -float("inf")
    a, sa = fp8_rowwise(v)
    b, sb = fp8_rowwise_ref(v)
    assert torch.equal(_bytes(a), _bytes(b)) and torch.equal(sa, sb)
    assert torch.equal(_bytes(a[0, 1:9]), _bytes(canonical_nan_e4m3(v[0, 1:9].to(torch.float8_e4m3fn))))
    assert float(a[2, 4].float()) == 448 and float(a[3, 5].float()) == -448 and torch.isnan(a[1, 3].float())


@pytest.mark.parametrize("k", [512, 1000, 5120])
def test_fp8_rowwise_gives_the_references_bytes_at_any_width(gen, k):
    """Rows narrower than, not a multiple of, and several times the kernel's block (masked
    tails), NaN, inf and all-zero rows included: the reference's bytes and scales."""
    v = (torch.randn(6, k, generator=gen) * torch.exp(torch.randn(6, k, generator=gen) * 3)).bfloat16()
    v[1, 3], v[2, 4], v[3, :] = float("nan"), float("inf"), 0.0
    got, ref = fp8_rowwise(v), fp8_rowwise_ref(v)
    assert torch.equal(_bytes(got[0]), _bytes(ref[0])) and torch.equal(got[1], ref[1])


def test_fp8_rowwise_with_the_ffn_gelu_is_the_quantization_of_torchs_gelu(gen):
    """`gelu=True` quantizes diffusers' FFN GELU (tanh) of the input, computed on the way as
    x / (1 + exp(-2u)): a GELU value one bf16 ulp off torch's on a few inputs, which the E4M3
    rounding hides nearly always; the row scales (from the rows' maxima) are the same."""
    x = (torch.randn(48, 1000, generator=gen) * 2.5).bfloat16()
    x[0, :6] = torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-4, -200.0])
    got_q, got_s = fp8_rowwise(x, gelu=True)
    want_q, want_s = fp8_rowwise_ref(torch.nn.functional.gelu(x, approximate="tanh"))
    assert torch.equal(got_s, want_s)
    same = _bytes(got_q) == _bytes(want_q)
    assert float(same.float().mean()) >= 0.999
    codes_apart = (_bytes(got_q).int() - _bytes(want_q).int()).abs()
    assert not (~same).any() or int(codes_apart[~same].max()) <= 1  # where they differ: the next E4M3 value
    plain_q, _ = fp8_rowwise(x)
    assert float((_bytes(plain_q) == _bytes(got_q)).float().mean()) < 0.9  # the GELU was applied


def test_nvfp4_to_fp8_and_bf16(gen, spiky):
    x = spiky((40, 320), gen, dtype=torch.bfloat16)
    w = quantize_ref(x)
    a, ra = nvfp4_to_fp8(w)
    b, rb = nvfp4_to_fp8_ref(w)
    assert torch.equal(_bytes(a), _bytes(b)) and torch.equal(ra, rb)
    # the FP8 form stays close to the NVFP4 values (one E4M3 rounding, <= 2**-4 relative
    # for normal E4M3 results)
    deq = dequantize_ref(w, torch.float32)
    approx = a.float() * ra.unsqueeze(1)
    ok = torch.isfinite(deq) & (a.float().abs() >= 2.0**-6)
    assert ((approx - deq).abs()[ok] <= deq.abs()[ok] / 16).all()
    assert torch.equal(torch.isnan(approx), torch.isnan(deq))
    bf = nvfp4_to_bf16(w)
    ref = dequantize_ref(w, torch.bfloat16)
    assert torch.equal(torch.where(torch.isnan(ref), 0x7FC0, ref.view(torch.int16)), bf.view(torch.int16))


def test_row_factors_match_reference(gen, spiky):
    from gpubake.kernels.convert_triton import fp8_row_factors

    w = quantize_ref(spiky((64, 256), gen))
    p, rs = fp8_row_factors(w)
    assert torch.equal(rs, nvfp4_to_fp8_ref(w)[1])
    assert torch.equal(p, torch.exp2(torch.log2(p).round()))  # powers of two
