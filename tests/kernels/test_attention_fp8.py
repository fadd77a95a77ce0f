"""Per-tensor FP8 attention (gpubake.kernels.attention_fp8) on the CPU.

No cuDNN here: the tests check the torch oracle `fp8_attention_reference` against float64
SDPA, the quantizer against E4M3's rounding, the CPU dispatch of `lowp_attention`, and
that the cuDNN custom op traces (its fake implementation) without CUDA. The cuDNN kernel
itself is compared to the reference on a GPU (bench/, issue 7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_util import SCALE
from attention_util import exact as _exact
from attention_util import qkv as _qkv
from attention_util import rel as _rel
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from gpubake.errors import KernelError
from gpubake.kernels import attention as A
from gpubake.kernels import attention_fp8 as A8

FP8 = torch.float8_e4m3fn

# fp8 reference vs float64 SDPA on N(0,1) q/v and K with a N(0,10) per-channel offset:
# 5.9-6.3e-2 relative measured over seeds, with or without the offset. E4M3 keeps 3
# mantissa bits (relative rounding error up to 2^-4 = 6.25e-2, ~3.6e-2 rms), and V, P
# and O are each rounded once: ~sqrt(3) * 3.6e-2. Without K smoothing the offset costs
# 0.27-0.30 (K's amax is the offset, so K's own values keep ~1 bit). The bound sits between.
EXACT_BOUND = 0.09




def _e4m3_half_ulp(y: torch.Tensor) -> torch.Tensor:
    """Half the E4M3 spacing at |y| (3 mantissa bits; subnormal spacing 2^-9 below 2^-6)."""
    _, e = torch.frexp(y.abs().double())  # |y| = m * 2^e, m in [0.5, 1): spacing 2^(e-4)
    return torch.ldexp(torch.ones_like(y, dtype=torch.float64), e - 5).clamp_min(2.0 ** -10)


# -- quantizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_tensor_is_e4m3_round_to_nearest(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 40, 16, generator=g) * torch.exp(torch.randn(2, 3, 40, 1, generator=g) * 2)).to(dtype)
    q, descale = A8.quantize_per_tensor(x)
    assert q.dtype == FP8 and q.shape == x.shape and q.stride() == x.stride()
    assert descale.dtype == torch.float32 and descale.shape == (1, 1, 1, 1)
    amax = x.abs().amax().float()
    assert descale.item() == pytest.approx(amax.item() / 448.0, rel=1e-6)
    i = x.abs().argmax()
    assert q.float().flatten()[i].abs().item() == 448.0 == q.float().abs().max().item()  # amax -> E4M3's max
    # every code is the nearest E4M3 value of x * 448/amax: error <= half an E4M3 ulp
    # (bf16 input: x * scale is rounded to bf16 first, up to bf16's unit roundoff 2^-8 more)
    y = x.double() * (448.0 / amax.double())
    slack = (2.0 ** -8 if dtype == torch.bfloat16 else 1e-6) * y.abs()
    assert ((q.double() - y).abs() <= _e4m3_half_ulp(y) + slack).all()
    assert (q.double() != y).any()  # it rounds (the bound is what a truncating cast would break)


def test_quantize_per_tensor_of_zeros_is_zeros_not_nan():
    q, descale = A8.quantize_per_tensor(torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16))
    assert torch.isfinite(descale).all() and descale.item() > 0  # amax clamped, not 0/0
    assert not q.float().isnan().any() and (q.float() == 0).all()


def test_smooth_k_removes_the_mean_over_tokens_only():
    q, k, _ = _qkv(64, 0, k_offset=10.0, dtype=torch.float32)
    ks = A8.smooth_keys(k)
    assert ks.abs().amax() < 0.5 * k.abs().amax()  # the per-channel offset is gone...
    torch.testing.assert_close(ks.mean(dim=-2), torch.zeros_like(ks.mean(dim=-2)), atol=1e-5, rtol=0)
    # ... and softmax(QK^T) did not change (one vector subtracted from every key)
    p, ps = ((q @ kk.transpose(-1, -2) * SCALE).softmax(-1) for kk in (k, ks))
    torch.testing.assert_close(ps, p, rtol=1e-3, atol=1e-5)


# -- reference attention -------------------------------------------------------------------

@pytest.mark.parametrize("k_offset", [0.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_is_close_to_exact_attention(k_offset, dtype):
    q, k, v = _qkv(256, 1, k_offset=k_offset, dtype=dtype)
    out = A8.fp8_attention_reference(q, k, v, SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, _exact(q, k, v)) < EXACT_BOUND
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # it is 8-bit, not SDPA


def test_exact_bound_catches_missing_k_smoothing_or_a_wrong_scale():
    """The bound above is not vacuous: no K smoothing, or a 5 % wrong softmax scale, breaks it."""
    q, k, v = _qkv(256, 0)
    ex = _exact(q, k, v)
    good = _rel(A8.fp8_attention_reference(q, k, v, SCALE), ex)
    unsmoothed = _rel(A8.fp8_attention_reference(q, k, v, SCALE, smooth=False), ex)
    wrong_scale = _rel(A8.fp8_attention_reference(q, k, v, SCALE * 1.05), ex)
    assert good < EXACT_BOUND < unsmoothed and unsmoothed > 3 * good
    assert wrong_scale > EXACT_BOUND


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = _qkv(128, 2)
    assert torch.equal(A8.fp8_attention_reference(q, k, v), A8.fp8_attention_reference(q, k, v, SCALE))


def test_output_reaches_a_huge_v_outlier_without_clipping():
    """O's FP8 scale is 448/amax(V): a row that attends to V's outlier gets O ~ amax(V)
    (E4M3's top code), finite and not clipped, and the rest stays accurate."""
    q, k, v = _qkv(256, 3, dtype=torch.float16)
    v[0, 0, 7, 5] = 3e4  # fp16's max is 65504
    q[0, 0, 0] = k[0, 0, 7] - k[0, 0].float().mean(0).half()  # row 0 attends to key 7 (after smoothing)
    q[0, 0, 0] *= 4
    out = A8.fp8_attention_reference(q, k, v, SCALE)
    ex = _exact(q, k, v)
    assert torch.isfinite(out).all()
    assert ex[0, 0, 0, 5] > 0.9 * 3e4  # the row really is dominated by the outlier
    assert out[0, 0, 0, 5].item() == pytest.approx(ex[0, 0, 0, 5].item(), rel=2 ** -4)
    assert _rel(out, ex) < EXACT_BOUND


# -- dispatch ----------------------------------------------------------------------------

def test_lowp_attention_cudnn_fp8_on_cpu_is_the_reference():
    q, k, v = _qkv(128, 4)
    assert A.eligible(q, k, v, min_tokens=128)
    out = A.lowp_attention(q, k, v, kernel="cudnn-fp8", min_tokens=128)
    assert torch.equal(out, A8.fp8_attention_reference(q, k, v, SCALE))
    assert not torch.equal(out, A.sage_reference(q, k, v, SCALE))  # the kernel argument is honoured


@pytest.mark.parametrize("case", ["short", "fp32", "head_dim_32", "non_contiguous"])
def test_lowp_attention_cudnn_fp8_ineligible_is_exactly_sdpa(case):
    n = 64 if case == "short" else 128
    d = 32 if case == "head_dim_32" else 64
    q, k, v = _qkv(n, 5, d=d, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    if case == "non_contiguous":
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    min_tokens = A.MIN_TOKENS if case == "short" else 128
    out = A.lowp_attention(q, k, v, kernel="cudnn-fp8", min_tokens=min_tokens)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_lowp_attention_unknown_kernel_is_a_one_line_error():
    q, k, v = _qkv(8, 6)
    with pytest.raises(KernelError, match=r"^8-bit attention: kernel 'fp4' \(one of sage-int8, cudnn-fp8, fa3-fp8\)$"):
        A.lowp_attention(q, k, v, kernel="fp4")


def test_cudnn_op_without_the_wheel_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cudnn", None)  # any import of it now fails
    assert not A8.cudnn_frontend_available()
    q8 = torch.zeros(1, 2, 8, 64, dtype=FP8)
    d = torch.ones(1, 1, 1, 1)
    with pytest.raises(KernelError, match=r"nvidia-cudnn-frontend wheel is not installed"):
        A8.cudnn_fp8_sdpa(q8, q8, q8, d, d, d, SCALE)


# -- the custom op under tracing ------------------------------------------------------------

def _hnd_view(dev: str, dtype=torch.bfloat16) -> torch.Tensor:
    """[B, H, N, D] as diffusers hands it over: a transposed view of [B, N, H, D]."""
    return torch.empty(1, 300, 2, 64, device=dev, dtype=dtype).transpose(1, 2)


def test_fake_impl_keeps_q8_shape_dtype_and_strides_on_fake_cuda():
    """What torch.compile sees for a CUDA call: no GPU needed, strides of q8 (not contiguous)."""
    with FakeTensorMode():
        q8 = _hnd_view("cuda", FP8)
        d = torch.empty(1, 1, 1, 1, device="cuda")
        o = torch.ops.gpubake.cudnn_fp8_sdpa(q8, q8, q8, d, d, d, SCALE)
    assert isinstance(o, FakeTensor) and o.device.type == "cuda"
    assert (o.shape, o.dtype, o.stride()) == (q8.shape, FP8, q8.stride())
    assert not q8.is_contiguous()  # the stride check is not trivially true


def test_fp8_attention_compiles_as_one_graph_around_the_op():
    """fullgraph compile of the whole wrapper on META tensors: the quantization traces
    around the opaque op, whose fake impl gives q8's layout (the output is q's)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        return A8.cudnn_fp8_attention(q, k, v, SCALE)

    q, k, v = (_hnd_view("meta") for _ in range(3))
    torch._dynamo.reset()
    try:
        out = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
    finally:
        torch._dynamo.reset()
    assert (out.shape, out.dtype, out.stride(), out.device.type) == (q.shape, q.dtype, q.stride(), "meta")
    ops = [n for g in graphs for n in g.graph.nodes if "cudnn_fp8_sdpa" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == 1
