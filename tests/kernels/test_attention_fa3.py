"""Per-head FP8 attention through FlashAttention-3 (gpubake.kernels.attention_fa3) on the CPU.

No FA3 here (its wheel is sm_90 machine code linked to CUDA torch): the tests check the
torch oracle `fa3_attention_reference` against float64 SDPA, the per-head quantizer, the
CPU dispatch of `lowp_attention`, and the wrapper's plumbing (layouts, which descale goes
where, one graph under torch.compile) around a stand-in for the wheel's op that does the
kernel's arithmetic. The kernel itself is compared to the reference on a GPU
(bench/bench_attention.py: 0.008 relative on an H100).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_util import SCALE
from attention_util import exact as _exact
from attention_util import qkv as _qkv
from attention_util import rel as _rel

from gpubake.errors import KernelError
from gpubake.kernels import attention as A
from gpubake.kernels import attention_fa3 as F3
from gpubake.kernels import attention_fp8 as A8

FP8 = torch.float8_e4m3fn
# reference vs float64 SDPA on the shared inputs: 5.0-5.4e-2 measured over 8 seeds, bf16 and
# fp16, with and without K's offset (cuDNN's per-tensor arithmetic, which also rounds O:
# 5.7-6.3e-2). A 5 % wrong softmax scale gives 7.8-9.2e-2, no K smoothing 0.20-0.30.
EXACT_BOUND = 0.07


def test_quantize_per_head_scales_each_head_to_e4m3_max():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 16, generator=g) * torch.tensor([1e-3, 1.0, 50.0]).view(1, 3, 1, 1)
    codes, descale = F3.quantize_per_head(x.bfloat16())
    assert codes.dtype == FP8 and codes.shape == x.shape
    assert descale.dtype == torch.float32 and descale.shape == (2, 3)
    amax = x.bfloat16().float().abs().amax(dim=(-2, -1))
    torch.testing.assert_close(descale, amax / 448.0, rtol=1e-6, atol=0)
    assert (codes.float().abs().amax(dim=(-2, -1)) == 448.0).all()  # every head reaches E4M3's top
    deq = codes.float() * descale[..., None, None]
    assert _rel(deq, x) < 2 ** -4  # 3 mantissa bits, whatever the head's magnitude


def test_quantize_per_head_keeps_memory_layout_and_zero_heads():
    x = torch.randn(1, 300, 2, 64).bfloat16().transpose(1, 2)  # diffusers' [B, H, N, D] view
    x[:, 1] = 0
    codes, descale = F3.quantize_per_head(x)
    assert codes.stride() == x.stride()  # so codes.transpose(1, 2) is FA3's contiguous [B, N, H, D]
    assert codes.transpose(1, 2).is_contiguous()
    assert torch.isfinite(descale).all() and (descale > 0).all()
    assert (codes[:, 1].float() == 0).all() and not codes.float().isnan().any()


@pytest.mark.parametrize("k_offset", [0.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_is_close_to_exact_attention(k_offset, dtype):
    q, k, v = _qkv(256, 1, k_offset=k_offset, dtype=dtype)
    out = F3.fa3_attention_reference(q, k, v, SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, _exact(q, k, v)) < EXACT_BOUND
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # it is 8-bit, not SDPA


def test_bound_catches_missing_smoothing_or_a_wrong_scale():
    """The bound is not vacuous: no K smoothing, or a 5 % wrong softmax scale, breaks it."""
    q, k, v = _qkv(256, 0)
    ex = _exact(q, k, v)
    good = _rel(F3.fa3_attention_reference(q, k, v, SCALE), ex)
    assert good < EXACT_BOUND < _rel(F3.fa3_attention_reference(q, k, v, SCALE, smooth=False), ex)
    assert _rel(F3.fa3_attention_reference(q, k, v, SCALE * 1.05), ex) > EXACT_BOUND
    assert good < _rel(A8.fp8_attention_reference(q, k, v, SCALE), ex)  # no FP8 rounding of O


def test_per_head_scales_keep_a_quiet_head_that_per_tensor_scales_lose():
    """One head's V 10^4 x smaller than the other's: per-tensor E4M3 (cuDNN's graph) pushes it
    into subnormals, per-head scales (FA3's descales) keep it as accurate as the loud one."""
    q, k, v = _qkv(256, 3, dtype=torch.float32)
    v[:, 0] *= 1e-4
    ex = _exact(q, k, v)
    fa3, cudnn = F3.fa3_attention_reference(q, k, v, SCALE), A8.fp8_attention_reference(q, k, v, SCALE)
    assert _rel(fa3[:, 0], ex[:, 0]) < EXACT_BOUND
    assert _rel(cudnn[:, 0], ex[:, 0]) > 2 * _rel(fa3[:, 0], ex[:, 0])


def test_lowp_attention_fa3_fp8_on_cpu_is_the_reference():
    q, k, v = _qkv(128, 4)
    out = A.lowp_attention(q, k, v, kernel="fa3-fp8", min_tokens=128)
    assert torch.equal(out, F3.fa3_attention_reference(q, k, v, SCALE))
    assert not torch.equal(out, A8.fp8_attention_reference(q, k, v, SCALE))  # not cuDNN's arithmetic
    short = A.lowp_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], kernel="fa3-fp8", min_tokens=128)
    assert torch.equal(short, F.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64]))


def test_wrapper_without_the_wheel_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, F3.FA3_MODULE, None)  # any import of it now fails
    assert not F3.fa3_available() and not A.kernel_available("fa3-fp8")
    q, k, v = _qkv(64, 5)
    with pytest.raises(KernelError, match=r"^fa3-fp8 attention: the fa3-fwd wheel is not installed"):
        F3.fa3_fp8_attention(q, k, v, SCALE)


# -- the wrapper around a stand-in for the wheel's op ---------------------------------------

@pytest.fixture(scope="module")
def fa3_stand_in():
    """`torch.ops.fa3_fwd._flash_attn_forward` as the wheel declares it (its arguments used
    here), computing FA3's FP8 arithmetic in [B, N, H, D] with [B, H] descales."""
    if F3.fa3_available():
        pytest.skip("the real fa3-fwd wheel is installed")

    @torch.library.custom_op("fa3_fwd::_flash_attn_forward", mutates_args=())
    def stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor,
                 k_descale: torch.Tensor, v_descale: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        assert q.dtype == k.dtype == v.dtype == FP8 and q.is_contiguous() and k.is_contiguous()
        b, n, h, _ = q.shape
        assert q_descale.shape == k_descale.shape == v_descale.shape == (b, h)
        qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
        s = qh @ kh.transpose(-1, -2) * (q_descale * k_descale * softmax_scale)[..., None, None]
        p = torch.exp(s - s.amax(-1, keepdim=True)) * F3.P_OFFSET
        o = (p.to(FP8).float() @ vh) * v_descale[..., None, None] / p.sum(-1, keepdim=True)
        return o.to(torch.bfloat16).transpose(1, 2).contiguous(), p.sum(-1).log()

    @stand_in.register_fake
    def _(q, k, v, q_descale, k_descale, v_descale, softmax_scale):
        b, n, h, d = q.shape
        return q.new_empty((b, n, h, d), dtype=torch.bfloat16), q.new_empty((b, h, n), dtype=torch.float32)

    yield stand_in


def _hnd(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Diffusers' [B, H, N, D] views of [B, N, H, D] memory, heads of different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) * torch.tensor(m).view(1, 1, 2, 1)
               for m in ((0.5, 1.0), (1.0, 0.7), (0.1, 10.0)))
    return tuple(t.bfloat16().transpose(1, 2) for t in (q, k, v))


def test_wrapper_passes_layout_and_descales_to_the_kernel(fa3_stand_in, monkeypatch):
    monkeypatch.setattr(F3, "fa3_available", lambda: True)
    q, k, v = _hnd(96, 6)
    out = F3.fa3_fp8_attention(q, k, v, SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, F3.fa3_attention_reference(q, k, v, SCALE)) < 1e-2  # bf16 output rounding only
    assert _rel(out, _exact(q, k, v)) < EXACT_BOUND


def test_wrapper_compiles_as_one_graph_around_the_op(fa3_stand_in):
    """fullgraph compile on META tensors: the availability check and quantization trace, the
    wheel's op stays one opaque node (a graph break here would split every compiled block)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = (torch.empty(1, 300, 2, 64, device="meta", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    torch._dynamo.reset()
    try:
        out = torch.compile(lambda q, k, v: F3.fa3_fp8_attention(q, k, v, SCALE), fullgraph=True,
                            backend=backend)(q, k, v)
    finally:
        torch._dynamo.reset()
    assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "meta")
    ops = [n for g in graphs for n in g.graph.nodes if "fa3_fwd" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == 1


# -- the boot check of an attention kernel (kernels.selfcheck) --------------------------------

@pytest.mark.parametrize("kernel", A.LOWP_KERNELS)
def test_attention_selfcheck_on_cpu_runs_the_kernel_path(kernel):
    """On the CPU each kernel's path is its reference: the check runs it through
    `lowp_attention` (no fallback to SDPA at its shape) and finds no difference."""
    from gpubake.kernels.selfcheck import attention_selfcheck

    res = attention_selfcheck(kernel, "cpu")
    assert res["ok"] and res["vs_reference"] == 0.0 and res["kernel"] == kernel
    assert 1e-3 < res["rel_error"] == res["reference_rel_error"] < res["bound"] / 1.5  # 8-bit, within its bound


@pytest.mark.parametrize("fault, reason", [
    ("heads", r"relative error [\d.]+ against exact attention > 0\.1\d+ \(2x its reference's\)"),  # wrong head order
    ("scale", r"relative error [\d.]+ against exact attention > 0\.1\d+ \(2x its reference's\)"),  # 2x softmax scale
    ("values", r"relative error [\d.]+ against exact attention"),  # garbage
    ("nan", r"relative error inf against exact attention"),
    ("raises", r"^RuntimeError: no kernel image is available for execution on the device$"),
])
def test_attention_selfcheck_catches_a_wrong_kernel(monkeypatch, fault, reason):
    from gpubake.kernels.selfcheck import attention_selfcheck

    def broken(q, k, v, scale=None, kernel="fa3-fp8", min_tokens=A.MIN_TOKENS):
        if fault == "raises":
            raise RuntimeError("no kernel image is available\nfor execution on the device")
        if fault == "heads":
            return F3.fa3_attention_reference(q, k, v, scale).flip(1)
        if fault == "scale":
            return F3.fa3_attention_reference(q, k, v, 2 * q.shape[-1] ** -0.5)
        return v if fault == "values" else torch.full_like(q, float("nan"))

    monkeypatch.setattr(A, "lowp_attention", broken)
    res = attention_selfcheck("fa3-fp8", "cpu")
    assert not res["ok"]
    import re

    assert re.search(reason, res["reason"]), res
