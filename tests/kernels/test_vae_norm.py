"""The VAE's fused RMS norm + SiLU (Triton, run by the interpreter here: TRITON_INTERPRET=1,
set by this folder's conftest) against its torch reference, diffusers' arithmetic: bf16 within
two units in the last place on a few values (only the sum of squares' order differs), and the
same output in every layout the decoder hands it."""

from __future__ import annotations

import pytest
import torch

from gpubake.errors import KernelError
from gpubake.kernels import vae_norm
from gpubake.kernels.vae_norm import rms_norm_silu, rms_norm_silu_reference


def _inputs(c: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, c, 3, 5, 7, generator=g) * 3).to(dtype)
    x[0, :, 0, 0, 0] = 0  # a voxel of zeros: the norm's eps
    gamma = (1 + 0.1 * torch.randn(c, 1, 1, 1, generator=g)).to(dtype)
    return x, gamma


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the last place of bf16 at `want`."""
    w = want.float()
    ulp = torch.pow(2.0, torch.floor(torch.log2(w.abs().clamp_min(2.0 ** -126))) - 7)
    return (got.float() - w).abs() / ulp


@pytest.mark.parametrize("c", [16, 96, 192, 384])
@pytest.mark.parametrize("silu", [True, False])
def test_bf16_is_the_reference_up_to_the_sum_order(c, silu):
    for seed in range(3):
        x, gamma = _inputs(c, torch.bfloat16, seed=c + seed)
        want = rms_norm_silu_reference(x, gamma, c ** 0.5, silu=silu)
        u = _ulps(rms_norm_silu(x, gamma, c ** 0.5, silu=silu), want)
        # a 1-ulp normalised value can become 2 after the scale, gamma and SiLU roundings
        assert float(u.max()) <= 2 and float((u > 0).float().mean()) < 1e-3


def test_every_layout_the_decoder_hands_it_gives_the_same_output():
    x, gamma = _inputs(96, torch.bfloat16)
    want = rms_norm_silu(x, gamma, 96 ** 0.5)
    last = x.contiguous(memory_format=torch.channels_last_3d)
    padded = torch.cat([x, x[:, :32]], 1).contiguous(memory_format=torch.channels_last_3d)[:, :96]  # vae_conv_pad's slice
    assert vae_norm.voxel_stride(x) == 1 and vae_norm.voxel_stride(last) == 96 and vae_norm.voxel_stride(padded) == 128
    strided = x[:, :, :, :, ::2]  # spatial dims that do not collapse: copied first
    assert vae_norm.voxel_stride(strided) is None
    for got in (last, padded):
        assert torch.equal(rms_norm_silu(got, gamma, 96 ** 0.5), want)
    assert torch.equal(rms_norm_silu(strided, gamma, 96 ** 0.5), rms_norm_silu(strided.contiguous(), gamma, 96 ** 0.5))


def test_fp32_is_within_float32_rounding():
    x, gamma = _inputs(96, torch.float32)
    got, want = rms_norm_silu(x, gamma, 96 ** 0.5), rms_norm_silu_reference(x, gamma, 96 ** 0.5)
    assert float((got - want).abs().max()) < 1e-6 * float(want.abs().max())


def test_bad_inputs_are_one_kernel_error(monkeypatch):
    x, gamma = _inputs(16, torch.bfloat16)
    with pytest.raises(KernelError, match="gamma has 8 values for 16 channels"):
        rms_norm_silu(x, gamma[:8], 4.0)
    with pytest.raises(KernelError, match="bf16 or fp32"):
        rms_norm_silu(x.half(), gamma, 4.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="need a CUDA tensor"):
        rms_norm_silu(x, gamma, 4.0)
