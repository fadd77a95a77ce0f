"""The NVFP4 quantizer that runs on a device, chosen in one place.

Triton (`quantize_triton`) on CUDA; the plain-torch reference (`format.quantize_ref`)
elsewhere. Both give the same bytes (tests/kernels), so the choice is only about speed,
and a CPU without Triton installed still quantizes. Every caller (`NVFP4Linear.from_linear`,
`gpubake quantize`, the boot self-check) goes through here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpubake.kernels.format import NVFP4Tensor, quantize_ref

Quantizer = Callable[..., NVFP4Tensor]  # (x, global_scale=None) -> NVFP4Tensor


def quantizer_for(device: torch.device | str) -> Quantizer:
    """`quantize_triton.quantize` for a CUDA device, `format.quantize_ref` for any other."""
    if torch.device(device).type == "cuda":
        from gpubake.kernels.quantize_triton import quantize as triton_quantize

        return triton_quantize
    return quantize_ref


def quantize(x: torch.Tensor, global_scale: float | torch.Tensor | None = None) -> NVFP4Tensor:
    """NVFP4 of `x` by the quantizer of x's device."""
    return quantizer_for(x.device)(x, global_scale)
