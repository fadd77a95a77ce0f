"""Kernel tests run the Triton kernels through Triton's CPU interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gpubake.kernels.backends import BlackwellNative  # noqa: E402
from testutil import decode_operand  # noqa: E402


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



class EmulatedBlackwell(BlackwellNative):
    """`blackwell-native` on the CPU: its real `apply`/`apply_fused` and `operands()` (the
    Triton quantizer under the interpreter) and, in place of the FP4 tensor cores (`_gemm`),
    `torch._scaled_mm`'s NVFP4 algebra in float64: decode A and B with their (un-swizzled)
    block scales, multiply, times alpha, plus the bias, rounded once."""

    needs_cuda = False

    def _gemm(self, x, op, bias):
        K, N = x.shape[-1], op["b"].shape[0]
        x2 = x.reshape(-1, K)
        a = decode_operand(op["a"], op["scale_a"], x2.shape[0], K).double()
        b = decode_operand(op["b"], op["scale_b"], N, K).double()
        y = (a @ b.t()) * op["alpha"].double()
        if bias is not None:
            y = y + bias.double()
        return y.to(x.dtype).reshape(*x.shape[:-1], N)


@pytest.fixture
def emulated_blackwell() -> EmulatedBlackwell:
    return EmulatedBlackwell()
