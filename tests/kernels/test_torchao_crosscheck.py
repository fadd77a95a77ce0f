"""Agreement with torchao's NVFP4 (torchao.prototype.mx_formats, CPU).

Same bytes and scales for every finite input and for +-inf. Documented differences:
1. NaN blocks: both give the E4M3 NaN scale (0x7F); torchao's codes there are 0x4 (its
   float->fp4 cast maps NaN to 2.0), ours are 0x0. Both dequantize the block to NaN.
2. dequantize: we compute (e2m1 * s) * g (e2m1 * s is exact, so one rounding); torchao
   computes e2m1 * (g * s) (two roundings). Results differ by at most 1 float32 ulp.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gpubake.kernels.format import dequantize_ref, quantize_ref, unpack_fp4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor as AONVFP4, nvfp4_quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bytes_and_scales(dtype, gen, spiky):
    x = spiky((128, 512), gen, dtype=dtype, specials=False)
    x.view(-1)[16:32] = 0
    x.view(-1)[33] = -0.0
    x.view(-1)[70] = float("inf")
    x.view(-1)[90] = -float("inf")
    q = quantize_ref(x)
    s, d = nvfp4_quantize(x, 16, q.global_scale)
    assert torch.equal(s.view(torch.uint8), q.block_scale.view(torch.uint8))
    assert torch.equal(d, q.data)


def test_nan_block_difference_is_only_the_codes(gen, spiky):
    x = spiky((4, 64), gen, specials=False)
    x[1, 20] = float("nan")
    q = quantize_ref(x)
    s, d = nvfp4_quantize(x, 16, q.global_scale)
    assert torch.equal(s.view(torch.uint8), q.block_scale.view(torch.uint8))
    ours, theirs = unpack_fp4(q.data), unpack_fp4(d)
    differ = ours != theirs
    assert differ.any() and (differ[1, 16:32] == differ[1, 16:32]).all()
    assert not differ[:, :16].any() and not differ[0].any() and not differ[2:].any()
    assert (ours[1, 16:32] == 0).all() and (theirs[1, 16:32] == 4).all()


def test_dequantize_within_one_ulp(gen, spiky):
    x = spiky((64, 256), gen, specials=False)
    q = quantize_ref(x)
    t = AONVFP4.to_nvfp4(x, per_tensor_scale=q.global_scale)
    ours, theirs = dequantize_ref(q, torch.float32), t.dequantize(torch.float32)
    ulp = torch.nextafter(ours.abs(), torch.tensor(float("inf"))) - ours.abs()
    assert ((ours - theirs).abs() <= ulp).all()
    assert not torch.equal(ours, theirs)  # the difference is real (else drop this doc note)
