"""Kernel tests run the Triton kernels through Triton's CPU interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gpubake.kernels.backends import BlackwellNative  # noqa: E402
from gpubake.kernels.format import BLOCK, e2m1_decode, unpack_fp4, unswizzle_scales  # noqa: E402


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
    """`blackwell-native` on the CPU: its real `operands()` (the Triton quantizer under the
    interpreter) and, in place of the FP4 tensor cores, `torch._scaled_mm`'s NVFP4 algebra
    in float64: decode A and B with their (un-swizzled) block scales, multiply, times alpha."""

    needs_cuda = False

    def apply(self, x, pw, bias=None):
        self.check(x, pw)
        N, K = pw.out_features, pw.in_features
        x2 = x.reshape(-1, K)
        op = self.operands(x2, pw)
        a = decode_operand(op["a"], op["scale_a"], x2.shape[0], K).double()
        b = decode_operand(op["b"], op["scale_b"], N, K).double()
        y = (a @ b.t()) * op["alpha"].double()
        if bias is not None:
            y = y + bias.double()
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    def apply_fused(self, x, pws, biases):
        """`apply_fused`'s algebra the same way, from its real `operands_fused()`."""
        K, N = pws[0].in_features, sum(pw.out_features for pw in pws)
        x2 = x.reshape(-1, K)
        op = self.operands_fused(x2, pws)
        a = decode_operand(op["a"], op["scale_a"], x2.shape[0], K).double()
        b = decode_operand(op["b"], op["scale_b"], N, K).double()
        y = (a @ b.t()) * op["alpha"].double()
        if any(bias is not None for bias in biases):
            y = y + torch.cat([bias if bias is not None else torch.zeros(pw.out_features)
                               for bias, pw in zip(biases, pws)]).double()
        return y.to(x.dtype).reshape(*x.shape[:-1], N)


def decode_operand(data: torch.Tensor, blocked: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """An FP4 operand of `_scaled_mm` as it defines it: e2m1 * block scale (no global scale)."""
    v = e2m1_decode(unpack_fp4(data))
    s = unswizzle_scales(blocked, rows, k // BLOCK).float()
    return (v.reshape(rows, -1, BLOCK) * s.unsqueeze(-1)).reshape(rows, k)


@pytest.fixture
def emulated_blackwell() -> EmulatedBlackwell:
    return EmulatedBlackwell()
