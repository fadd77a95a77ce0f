"""Step cache (issue 18): reuse the transformer blocks' work of an earlier step.

The runtime plan's ``step_cache`` lever, off (``none``) by default; both kinds are
approximations (the clip changes), dials measured by `bench/bench_clip.py --variant step_cache=...`:

- ``fbc:THRESHOLD``: diffusers' First Block Cache (`diffusers.hooks.FirstBlockCacheConfig`,
  0.42.1 hooks/first_block_cache.py), one per expert, through `CacheMixin.enable_cache`.
  Every forward runs the first block; when its residual changed by less than THRESHOLD
  (relative mean absolute difference) since the same context's previous forward, the other
  blocks are skipped and their cached residual is added instead. It needs no calibration and
  decides per forward from the model's own activations, so its skips (and its speed) on
  random weights say nothing of the real checkpoint's.
- ``mag:THRESHOLD[:K[:RETENTION]]``: MagCache (`gpubake.provisioning.mag_cache`), whole
  forwards skipped on a schedule the checkpoint's calibrated magnitude ratios fix before the
  clip (the authors' Wan 2.2 T2V-A14B and TI2V-5B tables, `mag_ratios.json`), so the
  forwards it skips are known in advance and the same on every prompt; a schedule without a
  table computes every forward. K (default 2): forwards skipped in a row at most; RETENTION (default 0.2): the
  fraction of each expert's first forwards never skipped. The authors' own T2V-A14B example is
  ``mag:0.06:2:0.4``.

TaylorSeer, diffusers' other step cache, caches every hooked module's outputs (the default
hooks every attention module: at 480p about 0.3 GB a tensor, times 40 blocks, orders and
contexts) or, in lite mode, skips whole steps on a fixed interval, blind to where the
schedule changes fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.provisioning.models import experts_of

FORMS = ("none | fbc:THRESHOLD | mag:THRESHOLD[:K[:RETENTION]] (THRESHOLD in (0, 1], K an integer in [1, 8], "
         "RETENTION in [0, 1))")
MAG_MAX_SKIPS, MAG_RETENTION = 2, 0.2  # MagCache4Wan2.2's defaults (its example for T2V-A14B: retention 0.4)
BLOCK_LISTS = ("blocks",)  # WanTransformer3DModel's repeated blocks (diffusers' _ALL_TRANSFORMER_BLOCK_IDENTIFIERS)


class StepCacheError(GpubakeError):
    """A step_cache value that is not one of FORMS, or a model it cannot be put on."""


@dataclass(frozen=True)
class StepCache:
    """One parsed ``step_cache`` value."""

    kind: str = "none"  # none | fbc | mag
    threshold: float | None = None
    max_skips: int | None = None  # mag only
    retention: float | None = None  # mag only

    @classmethod
    def parse(cls, value: str) -> StepCache:
        raw = value.strip()
        if raw == "none":
            return cls()
        kind, _, rest = raw.partition(":")
        args = rest.split(":") if rest else []
        threshold = _number(args[0]) if args else math.nan
        if math.isfinite(threshold) and 0.0 < threshold <= 1.0:
            if kind == "fbc" and len(args) == 1:
                return cls("fbc", threshold)
            if kind == "mag" and len(args) <= 3:
                k = _number(args[1]) if len(args) > 1 else float(MAG_MAX_SKIPS)
                r = _number(args[2]) if len(args) > 2 else MAG_RETENTION
                if k.is_integer() and 1 <= k <= 8 and 0.0 <= r < 1.0:
                    return cls("mag", threshold, int(k), r)
        raise StepCacheError(f"step_cache={value!r}: one of {FORMS}")

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        if not self.on:
            return "none"
        if self.kind == "mag":
            return f"mag:{self.threshold:g}:{self.max_skips}:{self.retention:g}"
        return f"{self.kind}:{self.threshold:g}"

    def config(self) -> Any:
        """The diffusers cache config of an ``fbc`` value (None otherwise)."""
        if self.kind != "fbc":
            return None
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def blocks_of(model: Any) -> list[Any]:
    """The repeated transformer blocks diffusers' block caches hook, in order."""
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if blocks is not None:
            return list(blocks)
    return []


def apply_step_caches(pipe: Any, value: str | StepCache) -> dict[str, dict[str, Any]]:
    """Put `value` on every expert of `pipe` in place, replacing any cache they had (``none``:
    back to the full forward, exactly); returns, per expert, what was done, for the plan's
    ``applied`` (nothing for ``none``: an uncached expert's report is what it was before the
    lever existed). A module in both expert slots gets one cache."""
    from gpubake.provisioning.mag_cache import apply_mag_cache, remove_mag_cache

    cache = value if isinstance(value, StepCache) else StepCache.parse(value)
    experts = experts_of(pipe)
    for model in experts.values():
        if getattr(model, "is_cache_enabled", False):
            model.disable_cache()
        remove_mag_cache(model)
    pipe._gpubake_step_cache = StepCache()
    if not cache.on:
        return {n: {} for n in experts}
    for model in experts.values():
        _check_cacheable(model, cache)
    pipe._gpubake_step_cache = cache
    if cache.kind == "mag":
        from gpubake.provisioning.mag_cache import MagSettings

        return apply_mag_cache(pipe, MagSettings(cache.threshold, cache.max_skips, cache.retention))
    done: dict[int, dict[str, Any]] = {}
    for model in experts.values():
        if id(model) not in done:
            model.enable_cache(cache.config())
            done[id(model)] = {"step_cache": str(cache), "cached_blocks": len(blocks_of(model)) - 1}
    return {n: dict(done[id(m)]) for n, m in experts.items()}


def applied_step_cache(pipe: Any) -> StepCache:
    """The step cache `apply_step_caches` last put on `pipe` (none if it never ran)."""
    return getattr(pipe, "_gpubake_step_cache", None) or StepCache()


@contextlib.contextmanager
def step_cache_for_clip(pipe: Any, value: str | StepCache | None) -> Iterator[StepCache]:
    """`value` on the experts for one clip (a request's choice), then the one they had again
    (the runtime plan's), also when the clip raised; None, or the cache already on: nothing
    changes. Yields the cache the clip runs with."""
    before = applied_step_cache(pipe)
    cache = before if value is None else value if isinstance(value, StepCache) else StepCache.parse(value)
    if str(cache) == str(before):
        yield before
        return
    try:
        apply_step_caches(pipe, cache)
        yield cache
    finally:
        apply_step_caches(pipe, before)


def _check_cacheable(model: Any, cache: StepCache) -> None:
    if not hasattr(model, "enable_cache"):
        raise StepCacheError(f"step_cache={cache}: {type(model).__name__} is not a diffusers CacheMixin model")
    n = len(blocks_of(model))
    if cache.kind == "fbc" and n < 2:  # First Block Cache hooks a head and a tail block
        raise StepCacheError(f"step_cache={cache}: {type(model).__name__} has {n} transformer block(s), needs 2")


def reset_step_caches(pipe: Any) -> None:
    """Forget every expert's cached residuals: a clip starts from none. WanPipeline resets
    them itself when a clip ends (`maybe_free_model_hooks`); a clip that raised did not."""
    from gpubake.provisioning.mag_cache import has_mag_cache

    for model in experts_of(pipe).values():
        if getattr(model, "is_cache_enabled", False) or has_mag_cache(model):
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
    for name, model in experts_of(pipe).items():
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
