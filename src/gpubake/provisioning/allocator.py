"""The CUDA caching allocator's settings for the self-test and the service: expandable
segments, unless the user set ``PYTORCH_CUDA_ALLOC_CONF`` themselves.

Why: on the 24 GB-card run (an H200 capped to 23.5 GiB, docs/benchmarks.md "Per clip") the
small-card plan died asking for 320 MiB with 22.05 GiB allocated and 1.39 GiB reserved but
free, in blocks too small for it. With expandable segments the allocator maps more memory
into a segment it already has instead of needing a free block of the size asked for, the
remedy PyTorch's CUDA-semantics notes give for fragmentation. torch reads the variable when
its allocator starts, at the first CUDA allocation: call this before any.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT = "expandable_segments:True"


def use_expandable_segments(env: MutableMapping[str, str] | None = None) -> str:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to expandable segments unless it is set (an empty value
    counts as unset); returns the value now in force, for the report."""
    env = os.environ if env is None else env
    if not env.get(ALLOC_CONF):
        env[ALLOC_CONF] = DEFAULT
    return env[ALLOC_CONF]
