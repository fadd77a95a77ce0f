"""Step cache (issue 18): reuse the transformer blocks' work of the previous step, through
diffusers' own cache hooks (`CacheMixin.enable_cache`), one per expert.

The runtime plan's ``step_cache`` lever: ``none`` (default) or ``fbc:THRESHOLD``, diffusers'
First Block Cache (`diffusers.hooks.FirstBlockCacheConfig`, 0.42.1
hooks/first_block_cache.py). Every forward runs the first block; when its residual changed
by less than THRESHOLD (relative mean absolute difference) since the same context's
previous forward, the other blocks are skipped and their cached residual is added instead.

Why First Block Cache for Wan 2.2 A14B and its 40-step UniPC recipe, of diffusers' caches
(docs/source/en/optimization/cache.md; docs/selftest.md, "The runtime plan"):
- it needs no calibration: MagCache needs `mag_ratios` per checkpoint and scheduler, and
  counts its own steps per state up to `num_inference_steps`, while each A14B expert runs
  only its share of the steps (the boundary depends on the step count and shift);
- it decides per forward from the model's own activations, so a request's step count,
  guidance or `cfg_until` changes nothing: its state is keyed by the pipeline's
  ``cache_context("cond" / "uncond")`` and each expert has its own, so an expert's first
  step always computes;
- TaylorSeer caches every hooked module's outputs (the default hooks every attention
  module: at 480p about 0.3 GB a tensor, times 40 blocks, orders and contexts) or, in lite
  mode, skips whole steps on a fixed interval, blind to where the schedule changes fast.
It is an approximation: the clip changes. The threshold is a speed/quality dial measured by
`bench/bench_clip.py --variant step_cache=fbc:T`, not set by default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gpubake.errors import GpubakeError

FORMS = "none | fbc:THRESHOLD (THRESHOLD in (0, 1])"
BLOCK_LISTS = ("blocks",)  # WanTransformer3DModel's repeated blocks (diffusers' _ALL_TRANSFORMER_BLOCK_IDENTIFIERS)


class StepCacheError(GpubakeError):
    """A step_cache value that is not one of FORMS, or a model it cannot be put on."""


@dataclass(frozen=True)
class StepCache:
    """One parsed ``step_cache`` value."""

    kind: str = "none"  # none | fbc
    threshold: float | None = None

    @classmethod
    def parse(cls, value: str) -> StepCache:
        raw = value.strip()
        if raw == "none":
            return cls()
        kind, sep, arg = raw.partition(":")
        if kind == "fbc" and sep:
            try:
                t = float(arg)
            except ValueError:
                t = math.nan
            if math.isfinite(t) and 0.0 < t <= 1.0:
                return cls("fbc", t)
        raise StepCacheError(f"step_cache={value!r}: one of {FORMS}")

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        return "none" if not self.on else f"{self.kind}:{self.threshold:g}"

    def config(self) -> Any:
        """The diffusers cache config of this value (None for none)."""
        if not self.on:
            return None
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


def blocks_of(model: Any) -> list[Any]:
    """The repeated transformer blocks diffusers' block caches hook, in order."""
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if blocks is not None:
            return list(blocks)
    return []


def apply_step_cache(model: Any, value: str | StepCache) -> dict[str, Any]:
    """Put `value` on one expert in place, replacing any cache it had (``none``: back to the
    full forward, exactly); returns what was done, for the plan's ``applied`` (nothing for
    ``none``: an uncached expert's report is what it was before the lever existed)."""
    cache = value if isinstance(value, StepCache) else StepCache.parse(value)
    if getattr(model, "is_cache_enabled", False):
        model.disable_cache()
    if not cache.on:
        return {}
    if not hasattr(model, "enable_cache"):
        raise StepCacheError(f"step_cache={cache}: {type(model).__name__} is not a diffusers CacheMixin model")
    n = len(blocks_of(model))
    if n < 2:  # First Block Cache hooks a head and a tail block
        raise StepCacheError(f"step_cache={cache}: {type(model).__name__} has {n} transformer block(s), needs 2")
    model.enable_cache(cache.config())
    return {"step_cache": str(cache), "cached_blocks": n - 1}


def reset_step_caches(pipe: Any) -> None:
    """Forget every expert's cached residuals: a clip starts from none. WanPipeline resets
    them itself when a clip ends (`maybe_free_model_hooks`); a clip that raised did not."""
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if getattr(model, "is_cache_enabled", False):
            model._reset_stateful_cache()


@dataclass
class BlockCounts:
    """Full block evaluations (a block's feed-forward ran) and transformer forwards, per expert."""

    blocks: dict[str, int]
    forwards: dict[str, int]

    def total_blocks(self) -> int:
        return sum(self.blocks.values())

    def total_forwards(self) -> int:
        return sum(self.forwards.values())

    def to_dict(self, blocks_per_forward: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"block_evaluations": dict(self.blocks), "transformer_forwards": dict(self.forwards)}
        if blocks_per_forward:
            full = self.total_forwards() * blocks_per_forward
            if full and not self.total_blocks():
                # forwards ran but no block hook fired: the blocks are compiled (regional
                # compile), and hooks added after their graphs were traced are not in them
                d["blocks_skipped_fraction"] = None
                d["blocks_not_counted"] = "compiled blocks: the feed-forward hooks do not fire inside their graphs"
            else:
                d["blocks_skipped_fraction"] = round(1 - self.total_blocks() / full, 4) if full else None
        return d


@contextlib.contextmanager
def count_blocks(pipe: Any) -> Iterator[BlockCounts]:
    """Count, with forward hooks, each expert's forwards and its blocks' feed-forwards (a block
    a cache skipped runs none), while inside; the hooks are removed on the way out."""
    counts = BlockCounts({}, {})
    handles = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        counts.blocks[name] = counts.forwards[name] = 0

        def on_forward(*_: Any, n: str = name) -> None:
            counts.forwards[n] += 1

        def on_block(*_: Any, n: str = name) -> None:
            counts.blocks[n] += 1

        handles.append(model.register_forward_pre_hook(on_forward))
        handles += [b.ffn.register_forward_pre_hook(on_block) for b in blocks_of(model) if hasattr(b, "ffn")]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
