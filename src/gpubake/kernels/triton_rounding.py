"""Rounding float32 to a narrower float inside a Triton kernel, the same on the GPU and the CPU.

A kernel that reproduces a torch reference rounds where torch rounds (an op's bf16 output).
Triton's own bf16 cast truncates under TRITON_INTERPRET=1, where the GPU rounds to nearest
even, so CI would test other arithmetic than the GPU runs; this rounds on the bits instead.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_dtype(v, BF16: tl.constexpr):
    """float32 -> the nearest bf16 value (ties to even), still as float32, when `BF16`; else
    `v` unchanged (a float32 output needs no rounding)."""
    if BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        v = tl.where(v == v, rounded, v)  # NaN stays NaN
    return v
