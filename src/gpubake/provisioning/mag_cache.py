"""MagCache (issue 18): skip whole transformer forwards on a schedule that the checkpoint's
magnitude ratios fix before the clip starts.

MagCache (Ma et al., arXiv:2506.09045) rests on one observation: the ratio of the blocks'
residual norms between consecutive steps, |r_t| / |r_t-1|, is nearly the same for every
prompt of a model and schedule. So it is calibrated once (`mag_ratios.json`, with its
source). At run time each stream (a CFG context: ``cond``, ``uncond``) multiplies the ratios
since its last computed forward. While the accumulated error, the sum of |1 - product|,
stays under the threshold and at most K forwards in a row were skipped, a forward skips its
blocks and adds the stream's last computed residual instead.

The skips depend on the table, the step count and the expert boundary only, never on the
activations. So they are known before the clip (`skip_schedule`), the same on every prompt,
and a bench on random weights skips exactly the forwards the real checkpoint skips (its
quality still needs the real weights).

The rule is the authors' Wan 2.2 one (MagCache4Wan2.2/magcache_generate.py): one counter
over both experts and both streams; for text-to-video no skip during the first `retention`
of the high-noise expert's forwards, nor during the first `retention` of the low-noise
expert's (TI2V-5B, one expert: the first `retention` of the clip); for image-to-video
(I2V-A14B) no skip in the high-noise expert at all, nor during the first `retention` of the
low-noise expert's; a strict `<` on the threshold. One difference: an expert's first
forward of a stream always computes (another expert's residual is not its own). The
authors' rule implies this whenever retention keeps at least one forward, as at their
settings.

WanPipeline tells each forward its step (the cache context's `step_index`); diffusers'
WanImageToVideoPipeline (0.42.1) names only the stream. There the step is the scheduler's
own `step_index` (None until its first `step`, then the steps taken; `set_timesteps` resets
it), so a clip that died mid-way leaves nothing for the next to miscount.

Why not diffusers' `MagCacheConfig` (hooks/mag_cache.py, 0.42.1):
- its hook on every block is ``torch.compiler.disable``d, so under gpubake's regional compile
  every block would run eagerly;
- it holds one ratio table for every context;
- it counts each expert's steps up to one `num_inference_steps` fixed when it is enabled,
  while an A14B expert runs a request-dependent share of the steps.
What is taken from diffusers: its hook registry, the cache contexts WanPipeline sets (name,
step_index, num_inference_steps), and the reset of stateful hooks at the end of every clip.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from gpubake.provisioning.models import experts_of

log = logging.getLogger(__name__)

HOOK = "gpubake_mag_cache"
STREAMS = ("cond", "uncond")  # WanPipeline's cache_context names, in the table's order


@dataclass(frozen=True)
class MagSettings:
    """The dial: accumulated-error threshold, most forwards skipped in a row, retention fraction
    (the defaults a ``mag:`` value leaves out are `step_cache.StepCache`'s)."""

    threshold: float
    max_skips: int
    retention: float

    def __str__(self) -> str:
        return f"mag:{self.threshold:g}:{self.max_skips}:{self.retention:g}"


@dataclass(frozen=True)
class MagTable:
    """One calibration: the schedule it was measured on and a ratio per step and stream."""

    id: str
    scheduler: str  # "unipc" (UniPCMultistepScheduler)
    shift: float
    boundary_ratio: float | None
    steps: int
    cond: tuple[float, ...]
    uncond: tuple[float, ...]
    source: str = ""
    task: str = "t2v"  # "t2v" or "i2v": the pipeline it was calibrated with, and so the retention rule

    def ratios(self, stream: str, steps: int) -> tuple[float, ...]:
        """`stream`'s ratios for a clip of `steps` steps: nearest-neighbour resampling, as the
        authors resample theirs for another step count."""
        src = self.cond if stream == "cond" else self.uncond
        return tuple(src[i] for i in nearest_indices(len(src), steps))

    def matches(self, facts: ScheduleFacts) -> bool:
        same_boundary = (self.boundary_ratio is None) == (facts.boundary_ratio is None) and (
            self.boundary_ratio is None or math.isclose(self.boundary_ratio, facts.boundary_ratio or 0.0))
        return (facts.task == self.task and facts.scheduler == self.scheduler and facts.shift is not None
                and math.isclose(self.shift, facts.shift) and same_boundary)


def nearest_indices(src_len: int, target: int) -> list[int]:
    """Indices of `src_len` entries that stand for `target` (the authors' `nearest_interp`:
    numpy's round, half to even, as Python's)."""
    if target == 1:
        return [src_len - 1]
    scale = (src_len - 1) / (target - 1)
    return [round(i * scale) for i in range(target)]


@functools.cache
def tables() -> tuple[MagTable, ...]:
    """The shipped calibrations (`mag_ratios.json`)."""
    raw = json.loads(resources.files("gpubake.provisioning").joinpath("mag_ratios.json").read_text())
    out = []
    for t in raw["tables"]:
        s = t["schedule"]
        out.append(MagTable(id=t["id"], scheduler=s["scheduler"], shift=float(s["shift"]),
                            boundary_ratio=s.get("boundary_ratio"), steps=int(t["steps"]),
                            cond=tuple(t["cond"]), uncond=tuple(t["uncond"]), source=t["source"],
                            task=t["task"]))
    return tuple(out)


@dataclass(frozen=True)
class ScheduleFacts:
    """What a clip's schedule is, read from the pipeline once its timesteps are set."""

    scheduler: str
    shift: float | None
    boundary_ratio: float | None
    steps: int
    split: int | None  # the high-noise expert's step count (None: one expert)
    task: str = "t2v"  # "i2v" for diffusers' WanImageToVideoPipeline

    def describe(self) -> str:
        b = "one expert" if self.boundary_ratio is None else f"boundary {self.boundary_ratio:g}"
        return f"{self.task}, {self.scheduler}, shift {self.shift if self.shift is None else f'{self.shift:g}'}, {b}"


def task_of(pipeline_class: str) -> str:
    """"i2v" for diffusers' image-to-video Wan pipeline (its own MagCache table and rule), else "t2v"."""
    return "i2v" if pipeline_class == "WanImageToVideoPipeline" else "t2v"


def schedule_facts(pipe: Any, steps: int, scheduler: Any = None) -> ScheduleFacts:
    """The facts of a clip of `steps` steps on `pipe`, its timesteps already set on `scheduler`
    (default: the pipeline's, as WanPipeline sets them before its first step)."""
    sched = scheduler if scheduler is not None else pipe.scheduler
    kind = {"UniPCMultistepScheduler": "unipc"}.get(type(sched).__name__, type(sched).__name__)
    shift = sched.config.get("flow_shift") if hasattr(sched, "config") else None
    boundary = getattr(pipe.config, "boundary_ratio", None) if getattr(pipe, "transformer_2", None) is not None \
        else None
    split = None
    if boundary is not None:
        ts = [float(t) for t in getattr(sched, "timesteps", torch.empty(0)).tolist()]  # one transfer, not one a step
        train = sched.config.get("num_train_timesteps", 1000)
        split = sum(t >= boundary * train for t in ts) if len(ts) == steps else None
    return ScheduleFacts(kind, None if shift is None else float(shift), boundary, steps, split,
                         task_of(type(pipe).__name__))


def matching_table(facts: ScheduleFacts, available: Sequence[MagTable] | None = None) -> MagTable | None:
    """The first calibration (default: the shipped ones) measured on `facts`' schedule, or None."""
    return next((t for t in (tables() if available is None else available) if t.matches(facts)), None)


def table_for(scheduler: str, shift: float | None, boundary_ratio: float | None, task: str) -> MagTable | None:
    """The shipped calibration for a schedule (a recipe's sampler, shift and boundary; the
    pipeline's task), whatever its step count (a table is resampled to it), or None."""
    return matching_table(ScheduleFacts(scheduler, shift, boundary_ratio, 0, None, task))


def table_for_model(model: Any, one_expert: bool = False) -> MagTable | None:
    """The shipped calibration for a registry model's own recipe (`models.ModelInfo`); `one_expert`:
    the pipeline runs one expert, so the recipe's boundary does not apply."""
    r = model.recipe
    return table_for(r.sampler, r.shift, None if one_expert else r.boundary_ratio, task_of(model.pipeline))


def skip_schedule(ratios: Sequence[float], steps: int, split: int | None, stream: int,
                  settings: MagSettings, task: str = "t2v") -> frozenset[int]:
    """The steps at which stream `stream` (0 cond, 1 uncond) skips its blocks: the authors'
    rule over their interleaved counter ``cnt = 2 * step + stream``, plus an expert's first
    forward always computing. `task` "i2v": the authors' image-to-video retention (the whole
    high-noise expert computes)."""
    n, sp = 2 * steps, None if split is None else 2 * split
    ratio, run, err = 1.0, 0, 0.0
    skipped: set[int] = set()
    for step in range(steps):
        cnt = 2 * step + stream
        if sp is None:
            kept = cnt < int(n * settings.retention)
        elif task == "i2v":
            kept = cnt < int(sp + (n - sp) * settings.retention)
        else:
            kept = cnt < int(sp * settings.retention) or sp <= cnt <= (n - sp) * settings.retention + sp
        if kept:
            continue
        ratio *= ratios[step]
        run += 1
        err += abs(1.0 - ratio)
        first_of_expert = step == 0 or (split is not None and step == split)
        if err < settings.threshold and run <= settings.max_skips and not first_of_expert:
            skipped.add(step)
        else:
            ratio, run, err = 1.0, 0, 0.0
    return frozenset(skipped)


@dataclass(frozen=True)
class ClipSchedule:
    """Which forwards of one clip skip: per stream, its skipped steps (empty without a table)."""

    facts: ScheduleFacts
    table: str | None
    skips: dict[str, frozenset[int]]

    def skip(self, stream: str, step: int) -> bool:
        return step in self.skips.get(stream, frozenset())

    def skipped_forwards(self) -> int:
        return sum(len(s) for s in self.skips.values())


def clip_schedule(facts: ScheduleFacts, settings: MagSettings,
                  available: Sequence[MagTable] | None = None) -> ClipSchedule:
    """The clip's skips from the first table calibrated on its schedule; none without one."""
    table = matching_table(facts, available)
    if table is None or (facts.boundary_ratio is not None and facts.split is None):
        return ClipSchedule(facts, None, {})
    skips = {s: skip_schedule(table.ratios(s, facts.steps), facts.steps, facts.split, i, settings, table.task)
             for i, s in enumerate(STREAMS)}
    return ClipSchedule(facts, table.id, skips)


# ---------------------------------------------------------------- the hook on each expert

class _StreamState(BaseState):
    """One stream's last computed residual, shared by both experts (diffusers keeps one state
    per cache context)."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None
        self.expert: str | None = None

    def reset(self) -> None:
        self.residual, self.expert = None, None


@dataclass
class MagStats:
    """Forwards computed and skipped, per expert, since the cache was put on (never reset)."""

    computed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"computed": dict(self.computed), "skipped": dict(self.skipped)}


class _Shared:
    """What both experts' hooks share: the settings, the streams' states, the clip's schedule."""

    def __init__(self, pipe: Any, settings: MagSettings, available: Sequence[MagTable] | None) -> None:
        self.pipe = weakref.ref(pipe)
        self.settings, self.available = settings, available
        self.states = StateManager(_StreamState)
        self.schedule: ClipSchedule | None = None
        self._schedule_key: tuple[Any, ...] | None = None  # (scheduler id, boundary, step count) it is for
        self.stats = MagStats()
        self.warned: set[str] = set()

    def scheduler_step(self) -> tuple[int, int] | None:
        """(step, steps) from the pipeline's scheduler, for a pipeline whose cache context names
        only the stream; None where the scheduler keeps no step index or has no timesteps."""
        sched = getattr(self.pipe(), "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        if ts is None or len(ts) == 0 or not hasattr(sched, "step_index"):
            return None
        step = sched.step_index
        return (0 if step is None else int(step)), len(ts)

    def schedule_for(self, steps: int) -> ClipSchedule:
        """The schedule of the clip now running: computed on its first forward (the clip's end
        and `render` reset it) or when the scheduler or the step count changed since; never
        at every forward, which would read the timesteps back from the device each time."""
        pipe = self.pipe()
        key = (id(pipe.scheduler), getattr(pipe.config, "boundary_ratio", None), steps) if pipe is not None else None
        if self.schedule is None or key is None or self._schedule_key != key:
            facts = schedule_facts(pipe, steps) if pipe is not None else ScheduleFacts("?", None, None, steps, None)
            self.schedule, self._schedule_key = clip_schedule(facts, self.settings, self.available), key
            if self.schedule.table is None and facts.describe() not in self.warned:
                self.warned.add(facts.describe())
                log.warning("step_cache=%s: no magnitude ratios for this schedule (%s): every forward computes",
                            self.settings, facts.describe())
        return self.schedule

    def reset(self) -> None:
        self.states.reset()
        self.schedule = self._schedule_key = None


class _Blocks:
    """The one callable the transformer's block loop meets while the hook runs a forward:
    the real blocks in order, keeping the residual, or the stream's residual added instead."""

    def __init__(self, blocks: Sequence[torch.nn.Module], state: _StreamState, expert: str, skip: bool,
                 keep: bool = True) -> None:
        self.blocks, self.state, self.expert, self.skip = blocks, state, expert, skip
        self.keep = keep  # whether a computed forward keeps its residual (the stream's next may skip)
        self.skipped = False

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        res = self.state.residual
        if self.skip and res is not None and self.state.expert == self.expert and res.shape == hidden_states.shape:
            self.skipped = True
            return hidden_states + res
        x = hidden_states
        for block in self.blocks:
            x = block(x, *args, **kwargs)
        self.state.residual, self.state.expert = (x - hidden_states if self.keep else None), self.expert
        return x


class MagBlocks(torch.nn.ModuleList):
    """An expert's `blocks`: the same modules under the same keys. Iterated by the
    transformer's forward while the hook runs one, it yields the one `_Blocks` callable;
    otherwise (the plan's code, `state_dict`) the blocks."""

    _run: _Blocks | None = None

    def __iter__(self) -> Iterator[torch.nn.Module]:
        if self._run is not None:
            return iter((self._run,))
        return super().__iter__()

    def real(self) -> list[torch.nn.Module]:
        return list(super().__iter__())

    @contextlib.contextmanager
    def running(self, run: _Blocks) -> Iterator[None]:
        self._run = run
        try:
            yield
        finally:
            self._run = None


class MagCacheHook(ModelHook):
    """On each expert: asks the clip's schedule whether this forward skips, and runs it so."""

    _is_stateful = True  # WanPipeline resets it when a clip ends (maybe_free_model_hooks)

    def __init__(self, shared: _Shared, expert: str) -> None:
        super().__init__()
        self.shared, self.expert = shared, expert
        self.state_manager = shared.states  # diffusers sets each forward's cache context on it

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        module.blocks = MagBlocks(list(module.blocks))
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # sic: diffusers' name
        module.blocks = torch.nn.ModuleList(module.blocks.real())
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            ctx = self.state_manager.context
        except ValueError:  # called outside a pipeline's step loop: the full forward
            ctx = None
        if ctx is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if ctx.step_index is not None and ctx.num_inference_steps is not None:
            step, steps = int(ctx.step_index), int(ctx.num_inference_steps)
        elif (at := self.shared.scheduler_step()) is not None:  # WanImageToVideoPipeline
            step, steps = at
        else:
            return self.fn_ref.original_forward(*args, **kwargs)
        schedule = self.shared.schedule_for(steps)
        run = _Blocks(module.blocks.real(), self.state_manager.get_state(), self.expert,
                      schedule.skip(ctx.name, step), keep=schedule.skip(ctx.name, step + 1))
        with module.blocks.running(run):
            out = self.fn_ref.original_forward(*args, **kwargs)
        (self.shared.stats.skipped if run.skipped else self.shared.stats.computed)[self.expert] += 1
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.shared.reset()
        return module


def has_mag_cache(model: Any) -> bool:
    reg = getattr(model, "_diffusers_hook", None)
    return reg is not None and reg.get_hook(HOOK) is not None


def remove_mag_cache(model: Any) -> None:
    if has_mag_cache(model):
        model._diffusers_hook.remove_hook(HOOK, recurse=False)


def apply_mag_cache(pipe: Any, settings: MagSettings,
                    available: Sequence[MagTable] | None = None) -> dict[str, dict[str, Any]]:
    """Put MagCache on every expert of `pipe`, with one shared state (the authors' rule spans
    both experts); `available`: the calibrations to choose from (default: the shipped ones).
    Returns, per expert, what was done."""
    shared = _Shared(pipe, settings, available)
    done: dict[str, dict[str, Any]] = {}
    hooked: set[int] = set()
    for name, model in experts_of(pipe).items():
        remove_mag_cache(model)
        if id(model) not in hooked:  # a module in both slots gets one hook
            HookRegistry.check_if_exists_or_initialize(model).register_hook(MagCacheHook(shared, name), HOOK)
            hooked.add(id(model))
        done[name] = {"step_cache": str(settings), "cached_blocks": len(model.blocks),
                      "mag_tables": [t.id for t in (tables() if available is None else available)]}
    return done


def skipped_forwards(pipe: Any) -> int | None:
    """Forwards MagCache has skipped on `pipe`'s experts since it was put on (None without it):
    read before and after a clip, the difference is that clip's."""
    stats = mag_stats(pipe)
    return sum(stats.skipped.values()) if stats is not None else None


def mag_stats(pipe: Any) -> MagStats | None:
    """The forwards MagCache computed and skipped on `pipe`'s experts, or None without it."""
    for model in experts_of(pipe).values():
        if has_mag_cache(model):
            return model._diffusers_hook.get_hook(HOOK).shared.stats
    return None
