"""CFG truncation (issue 18): classifier-free guidance in the first steps only.

A guided Wan step runs two transformer forwards (conditional and unconditional); late in
the schedule the two predictions differ little, so a recipe (or a request) may keep CFG
for the first `cfg_until` fraction of the steps and run one forward a step after that.

No loop of ours: diffusers 0.42.1's WanPipeline reads `do_classifier_free_guidance`
(`self._guidance_scale > 1.0`) afresh at every step and runs the unconditional forward
only while it is true; `__call__` sets `_guidance_scale` from its argument at the start
of every call. Setting it to 1.0 from `callback_on_step_end` after the last guided step
is the same mechanism as diffusers' own `SDCFGCutoffCallback` (diffusers/callbacks.py,
which sets `pipeline._guidance_scale = 0.0` at its cutoff step); Wan keeps the two text
contexts apart (two forwards, not a batch of 2), so no embedding needs slicing.
"""

from __future__ import annotations

import math
from typing import Any

from gpubake.errors import GpubakeError


class CfgTruncationError(GpubakeError):
    """A `cfg_until` outside [0, 1]."""


def check_cfg_until(value: Any, where: str = "cfg_until") -> float | None:
    """`value` as a fraction in [0, 1], or None (every step guided); one line naming `where` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise CfgTruncationError(f"{where}: must be a number in [0, 1] (the fraction of steps that keep CFG), "
                                 f"got {value!r}")
    return float(value)


def cfg_steps(cfg_until: float | None, steps: int) -> int:
    """How many of `steps` steps keep CFG: `cfg_until * steps` rounded half up (None: all).

    The guided steps are the first ones (high noise, where guidance shapes the layout)."""
    cut = check_cfg_until(cfg_until)
    if cut is None:
        return steps
    return min(steps, math.floor(cut * steps + 0.5))


def truncate_after(guided: int, steps: int):
    """A `callback_on_step_end` step function that ends CFG after step `guided - 1`, or None
    when every step keeps it (`guided >= steps`; `guided == 0` is the caller's guidance 1.0)."""
    if guided <= 0 or guided >= steps:
        return None

    def end_cfg(pipe: Any, step: int) -> None:
        if step + 1 == guided:
            # WanPipeline.do_classifier_free_guidance is `_guidance_scale > 1.0`, read per step
            pipe._guidance_scale = 1.0

    return end_cfg
