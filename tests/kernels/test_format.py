"""The NVFP4 reference: element encoding, packing, scale layout, special values."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels.format import (
    E2M1_VALUES,
    NVFP4Tensor,
    dequantize_ref,
    e2m1_decode,
    e2m1_encode,
    pack_fp4,
    quantize_ref,
    swizzle_scales,
    unpack_fp4,
    unswizzle_scales,
)

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _nearest_even(v: float) -> int:
    """Brute-force RNE on the E2M1 grid: nearest value, ties to the even code."""
    d = (GRID - abs(v)).abs()
    best = [i for i in range(8) if d[i] == d.min()]
    code = best[0] if len(best) == 1 else [i for i in best if i % 2 == 0][0]
    return code | (8 if str(v).startswith("-") else 0)


def test_e2m1_encode_matches_brute_force_on_every_bf16_in_range():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.bfloat16).float()
    v = v[torch.isfinite(v) & (v.abs() <= 6)]
    got = e2m1_encode(v)
    mags = (v.abs().unsqueeze(1) - GRID).abs()
    # nearest magnitude; ties -> even code
    mn = mags.min(dim=1, keepdim=True).values
    cand = (mags == mn)
    even = cand & (torch.arange(8) % 2 == 0)
    code = torch.where(cand.sum(1) > 1, even.float().argmax(1), cand.float().argmax(1)).to(torch.uint8)
    code = code | (torch.signbit(v).to(torch.uint8) << 3)
    assert torch.equal(got, code)


@pytest.mark.parametrize("v,code", [(0.25, 0), (0.26, 1), (0.75, 2), (1.25, 2), (1.75, 4),
                                    (2.5, 4), (3.5, 6), (5.0, 6), (5.01, 7), (6.0, 7),
                                    (-0.0, 8), (-0.1, 8), (-0.75, 10), (-6.0, 15)])
def test_e2m1_ties_to_even(v, code):
    assert int(e2m1_encode(torch.tensor([v]))[0]) == code == _nearest_even(v)


def test_e2m1_decode_table():
    vals = e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert vals.tolist() == list(E2M1_VALUES)
    assert torch.signbit(vals[8])  # code 8 is -0.0


def test_pack_order_low_nibble_first_and_roundtrip(gen):
    assert pack_fp4(torch.tensor([[0x1, 0x2, 0xF, 0x8]], dtype=torch.uint8)).tolist() == [[0x21, 0x8F]]
    codes = torch.randint(0, 16, (3, 5, 64), generator=gen, dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)


def test_pack_matches_torchao():
    from torchao.prototype.mx_formats.kernels import pack_uint4

    codes = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    assert torch.equal(pack_fp4(codes), pack_uint4(codes))


@pytest.mark.parametrize("rows,cols", [(128, 4), (300, 21), (7, 3), (256, 320)])
def test_swizzle_matches_torchao_to_blocked_and_inverts(rows, cols, gen):
    from torchao.prototype.mx_formats.utils import to_blocked

    s = (torch.rand(rows, cols, generator=gen) * 400).to(torch.float8_e4m3fn)
    sw = swizzle_scales(s)
    assert sw.dtype == torch.float8_e4m3fn and sw.shape == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    assert torch.equal(sw.view(torch.uint8).flatten(), to_blocked(s.view(torch.uint8)).flatten())
    assert torch.equal(unswizzle_scales(sw, rows, cols).view(torch.uint8), s.view(torch.uint8))


def test_swizzle_layout_by_hand():
    # row 32*g + i, col c of a tile lands at 16*i + 4*g + c
    s = torch.arange(128 * 4, dtype=torch.int32).reshape(128, 4)
    flat = swizzle_scales(s).flatten()
    for r, c in [(0, 0), (1, 0), (32, 0), (33, 2), (127, 3)]:
        g, i = divmod(r, 32)
        assert int(flat[16 * i + 4 * g + c]) == int(s[r, c])


def test_unswizzle_rejects_wrong_size():
    with pytest.raises(KernelError, match="256x8 for 130x7"):
        unswizzle_scales(torch.zeros(10, dtype=torch.uint8), 130, 7)


def test_roundtrip_of_representable_values_is_exact(gen):
    codes = torch.randint(0, 16, (4, 64), generator=gen, dtype=torch.uint8)
    codes[:, ::16] = 0x7  # each block holds its max (6), so re-quantizing finds the same scale
    scales = torch.tensor([[1.0, 2.0, 0.5, 448.0]] * 4).to(torch.float8_e4m3fn)
    q = NVFP4Tensor(pack_fp4(codes), scales, torch.tensor(0.25), torch.Size((4, 64)))
    x = dequantize_ref(q, torch.float32)
    expect = e2m1_decode(codes).reshape(4, 4, 16) * scales.float().unsqueeze(-1) * 0.25
    assert torch.equal(x, expect.reshape(4, 64))
    q2 = quantize_ref(x, global_scale=0.25)
    assert torch.equal(dequantize_ref(q2, torch.float32), x)


def test_quantize_error_bound(gen, spiky):
    x = spiky((64, 256), gen, specials=False)
    q = quantize_ref(x)
    assert q.global_scale == x.abs().max() / 2688
    err = (dequantize_ref(q, torch.float32) - x).abs().reshape(64, 16, 16)
    # RNE on E2M1: error <= half the widest step (2 at the top: 4 -> 6) times the block scale,
    # plus the E4M3 rounding of the scale (<= 1/16 relative)
    step = q.block_scale.float() * q.global_scale
    assert (err <= 1.0 * step.unsqueeze(-1) * (1 + 1 / 16) + 1e-30).all()
    rel = (dequantize_ref(q, torch.float32) - x).norm() / x.norm()
    assert 0.02 < rel < 0.2


def test_global_scale_ignores_inf_nan_and_all_zero_floor():
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[1, 5] = float("inf"), float("nan"), -26.88
    assert float(quantize_ref(x).global_scale) == pytest.approx(26.88 / 2688, rel=1e-7)
    assert float(quantize_ref(torch.zeros(1, 16)).global_scale) == 2.0**-120


def test_special_values():
    x = torch.tensor([1.0] * 16 + [0.0] * 16 + [-0.0] * 16 + [float("inf"), -5.0] + [1.0] * 14
                     + [float("nan")] + [2.0] * 15 + [1e-30, -1e-30, 6.0] + [0.0] * 13).reshape(1, -1)
    q = quantize_ref(x, global_scale=1.0)
    codes = unpack_fp4(q.data)[0].reshape(6, 16)
    sb = q.block_scale.view(torch.uint8)[0].tolist()
    assert sb[1] == sb[2] == 0x08  # all-zero blocks: scale 2**-6, the smallest normal E4M3
    assert (codes[1] == 0).all() and (codes[2] == 8).all()  # +0 -> 0x0, -0 -> 0x8
    assert sb[3] == 0x7E and int(codes[3, 0]) == 0x7  # inf: scale saturates at 448, value at 6
    assert int(codes[3, 1]) == 8  # -5 / 448 rounds to zero, keeps its sign
    assert sb[4] == 0x7F and (codes[4] == 0).all()  # NaN block: NaN scale, zero codes
    assert [int(c) for c in codes[5, :3]] == [0, 8, 7]  # tiny values -> +-0
    d = dequantize_ref(q, torch.float32)[0].reshape(6, 16)
    assert torch.isnan(d[4]).all() and torch.isfinite(d[[0, 1, 2, 3, 5]]).all()
    assert float(d[3, 0]) == 6 * 448


def test_saturation_with_given_global_scale():
    x = torch.full((1, 16), 1e6)
    q = quantize_ref(x, global_scale=1.0)
    assert float(dequantize_ref(q, torch.float32)[0, 0]) == 6 * 448


def test_subnormal_scales_decode_exactly():
    # scales E4M3 bytes 0x01 (2**-9) and 0x07 (7 * 2**-9) are never produced, but decode
    data = pack_fp4(torch.full((1, 32), 0x7, dtype=torch.uint8))
    sc = torch.tensor([[0x01, 0x07]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    q = NVFP4Tensor(data, sc, torch.tensor(1.0), torch.Size((1, 32)))
    d = dequantize_ref(q, torch.float32)[0]
    assert float(d[0]) == 6 * 2.0**-9 and float(d[16]) == 6 * 7 * 2.0**-9
    # and the quantizer clamps scales up to 2**-6 instead of producing them
    q2 = quantize_ref(torch.tensor([[1.0] + [0.0] * 15, [1e-6] + [0.0] * 15]), global_scale=1 / 2688)
    assert q2.block_scale.view(torch.uint8)[1, 0] == 0x08


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(4, 24), r"\(4, 24\).*multiple of 16"),
    (torch.zeros(4, 32, dtype=torch.int32), "dtype torch.int32"),
    (torch.zeros(()), "multiple of 16"),
])
def test_bad_input(bad, match):
    with pytest.raises(KernelError, match=match):
        quantize_ref(bad)


@pytest.mark.parametrize("g", [0.0, -1.0, float("inf"), float("nan"), 1e-38])
def test_bad_global_scale(g):
    with pytest.raises(KernelError, match="global_scale"):
        quantize_ref(torch.ones(1, 16), global_scale=g)


def test_dtypes_and_leading_dims(gen, spiky):
    x = spiky((2, 3, 64), gen, specials=False)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        q = quantize_ref(x.to(dt))
        assert q.data.shape == (2, 3, 32) and q.block_scale.shape == (2, 3, 4)
        assert q.data.dtype == torch.uint8 and q.block_scale.dtype == torch.float8_e4m3fn
        assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == ()
        assert dequantize_ref(q).shape == (2, 3, 64)
