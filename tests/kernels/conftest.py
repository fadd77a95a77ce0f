"""Kernel tests run the Triton kernels through Triton's CPU interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def spiky():
    """Factory of test data (see `_spiky`)."""
    return _spiky


def _spiky(shape, gen, dtype=torch.float32, specials=True):
    """Gaussian rows with per-row magnitudes over ~6 decades, outliers, and (optionally)
    zeros, -0, +-inf and NaN at fixed places."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(*shape[:-1], 1, generator=gen) * 2)
    out = torch.rand(shape, generator=gen) < 0.02
    x = torch.where(out, x * 50, x)
    f = x.reshape(-1)
    if specials and f.numel() >= 200:
        f[16:32] = 0.0          # an all-zero block
        f[33] = -0.0
        f[40:48] = -0.0
        f[50] = float("nan")
        f[70] = float("inf")
        f[90] = -float("inf")
        f[120] = 1e-30          # tiny: rounds to 0 inside its block
        f[121] = -1e-30
    return x.to(dtype)
