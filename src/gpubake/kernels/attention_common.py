"""What the three 8-bit attention kernels share (`attention`, `attention_fp8`, `attention_fa3`).

A leaf module: the kernels import it, it imports none of them, so there is no import
cycle between them.
"""

from __future__ import annotations

import torch


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over tokens ([B, H, N, D]): the same softmax, smaller outliers."""
    return k - k.float().mean(dim=-2, keepdim=True).to(k.dtype)


def importable(module: str) -> bool:
    """Whether an optional kernel wheel imports here (it may load native libraries)."""
    try:
        __import__(module)
    except Exception:
        return False
    return True
