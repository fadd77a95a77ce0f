"""Inputs and error measure shared by the 8-bit attention tests (INT8 and FP8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE = 64 ** -0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(n: int, seed: int, d: int = 64, k_offset: float = 10.0, dtype=torch.bfloat16):
    """[1, 2, n, d] q, k, v; K gets a per-channel offset (the outliers smoothing removes)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    k = k + k_offset * torch.randn(d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def exact(q, k, v, scale=SCALE):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
