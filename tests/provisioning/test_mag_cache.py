"""MagCache (`step_cache=mag:...`, issue 18): the skip schedule against the authors' own rule
(a transcription of MagCache4Wan2.2's counter loop), the shipped table against the Wan 2.2
schedule it was calibrated on, and the hook on the tiny NVFP4 pipeline (CPU): the forwards it
skips are the schedule's, a skipped forward runs no block, nothing skipped is bit-exact, and
taking it off restores the experts as they were."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch
from testutil import guided_latents, tiny_cpu_pipe

from gpubake.provisioning.mag_cache import (MagBlocks, MagSettings, MagTable, ScheduleFacts, clip_schedule,
                                            mag_stats, nearest_indices, schedule_facts, skip_schedule, tables)
from gpubake.provisioning.models import get_recipe
from gpubake.provisioning.runtime import RuntimePlan, RuntimePlanError, apply_runtime, plan_from_env
from gpubake.provisioning.step_cache import StepCache, apply_step_caches

BLOCKS = 3  # tiny.TRANSFORMER_CONFIG num_layers
STEPS = 8


def authors_rule(interleaved: list[float], steps: int, split: int | None, threshold: float, k: int,
                 retention: float, mode: str = "t2v") -> set[tuple[int, int]]:
    """MagCache4Wan2.2's `magcache_forward` decision, as written there: one counter `cnt` over
    both streams (cond, uncond interleaved) and both experts; (step, stream) skipped. `split`
    None: TI2V-5B's one expert, no skip while `cnt < int(num_steps * retention_ratio)`; `mode`
    "i2v": I2V-A14B's, no skip while `cnt < int(split_step + (num_steps - split_step) * retention_ratio)`."""
    ratios = np.array([1.0] * 2 + interleaved)
    num_steps = steps * 2
    acc_ratio, acc_steps, acc_err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    skipped = set()
    for cnt in range(num_steps):
        if split is None:
            use = not cnt < int(num_steps * retention)
        elif mode == "i2v":
            split_step = split * 2
            use = not cnt < int(split_step + (num_steps - split_step) * retention)
        else:
            split_step = split * 2
            use = not (cnt < int(split_step * retention)
                       or (cnt <= ((num_steps - split_step) * retention + split_step) and cnt >= split_step))
        if use:
            acc_ratio[cnt % 2] *= ratios[cnt]
            acc_steps[cnt % 2] += 1
            acc_err[cnt % 2] += np.abs(1 - acc_ratio[cnt % 2])
            if acc_err[cnt % 2] < threshold and acc_steps[cnt % 2] <= k:
                skipped.add((cnt // 2, cnt % 2))
            else:
                acc_err[cnt % 2], acc_steps[cnt % 2], acc_ratio[cnt % 2] = 0, 0, 1.0
    return skipped


def shipped() -> MagTable:
    (t,) = [t for t in tables() if t.id == "wan22-t2v-a14b-40step"]
    return t


def interleaved(t: MagTable) -> list[float]:
    """The authors' list: cond and uncond interleaved, without their 2-entry padding."""
    return [x for pair in zip(t.cond, t.uncond) for x in pair][2:]


def a14b_facts(steps: int = 40, recipe_id: str = "wan22-t2v-a14b-40step", pipeline: str = "WanPipeline"
               ) -> ScheduleFacts:
    """The facts of an A14B 40-step recipe's schedule, from diffusers' own UniPC scheduler."""
    from diffusers import UniPCMultistepScheduler

    recipe = get_recipe(recipe_id)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=recipe.shift)
    sched.set_timesteps(steps)

    class config:
        boundary_ratio = recipe.boundary_ratio

    # what schedule_facts reads of a WanPipeline (or of a WanImageToVideoPipeline: its class name)
    Pipe = type(pipeline, (), {"scheduler": sched, "transformer_2": object(), "config": config})
    return schedule_facts(Pipe(), steps)


def i2v_table() -> MagTable:
    (t,) = [t for t in tables() if t.id == "wan22-i2v-a14b-40step"]
    return t


def test_the_shipped_table_lines_up_with_the_schedule_it_was_calibrated_on():
    t, facts = shipped(), a14b_facts()
    assert (t.scheduler, t.shift, t.boundary_ratio, t.steps) == ("unipc", 12.0, 0.875, 40) and t.matches(facts)
    assert facts.split == 26  # steps 0-25 high-noise (t >= 875)
    # the one outlier ratio of each stream is the first low-noise step: the expert changed
    for stream in (t.cond, t.uncond):
        assert len(stream) == 40 and stream[0] == 1.0
        assert min(range(40), key=lambda i: stream[i]) == facts.split and stream[facts.split] < 0.7


@pytest.mark.parametrize(("threshold", "k", "retention"), [(0.06, 2, 0.4), (0.04, 2, 0.2), (0.06, 3, 0.2),
                                                            (0.12, 4, 0.1)])
@pytest.mark.parametrize("steps", [40, 30])
def test_the_schedule_is_the_authors_rule(threshold, k, retention, steps):
    t = shipped()
    facts = a14b_facts(steps)
    settings = MagSettings(threshold, k, retention)
    ours = {(s, i) for i, name in enumerate(("cond", "uncond"))
            for s in skip_schedule(t.ratios(name, steps), steps, facts.split, i, settings)}
    if steps == 40:
        theirs = authors_rule(interleaved(t), steps, facts.split, threshold, k, retention)
    else:  # the authors resample each stream to the step count, then interleave
        cond = [t.cond[i] for i in nearest_indices(40, steps)]
        uncond = [t.uncond[i] for i in nearest_indices(40, steps)]
        theirs = authors_rule([x for p in zip(cond, uncond) for x in p][2:], steps, facts.split, threshold, k,
                              retention)
    assert ours == theirs and ours


@pytest.mark.parametrize(("threshold", "k", "retention"), [(0.06, 2, 0.2), (0.12, 3, 0.1)])
def test_the_one_expert_schedule_is_the_authors_rule(threshold, k, retention):
    (t,) = [t for t in tables() if t.id == "wan22-ti2v-5b-50step"]
    recipe = get_recipe("wan22-ti2v-5b-50step")
    facts = ScheduleFacts("unipc", recipe.shift, None, recipe.steps, None)
    assert t.matches(facts) and (t.steps, len(t.cond), len(t.uncond)) == (50, 50, 50)
    settings = MagSettings(threshold, k, retention)
    ours = {(s, i) for i, name in enumerate(("cond", "uncond"))
            for s in skip_schedule(t.ratios(name, 50), 50, None, i, settings)}
    assert ours == authors_rule(interleaved(t), 50, None, threshold, k, retention) and ours
    assert clip_schedule(facts, settings).table == "wan22-ti2v-5b-50step"


def test_the_authors_example_skips_28_of_80_forwards_at_40_steps():
    """`mag:0.06:2:0.4`, MagCache4Wan2.2's T2V-A14B command: 52 forwards computed of 80."""
    sched = clip_schedule(a14b_facts(), MagSettings(0.06, 2, 0.4))
    assert sched.table == "wan22-t2v-a14b-40step" and sched.skipped_forwards() == 28
    assert not any(sched.skip(s, step) for s in ("cond", "uncond") for step in (0, 26))  # each expert's first


def test_the_i2v_table_lines_up_with_the_i2v_recipe_and_only_an_i2v_pipeline_takes_it():
    t, facts = i2v_table(), a14b_facts(40, "wan22-i2v-a14b-40step", "WanImageToVideoPipeline")
    assert (t.task, t.scheduler, t.shift, t.boundary_ratio, t.steps) == ("i2v", "unipc", 5.0, 0.9, 40)
    assert facts.task == "i2v" and t.matches(facts)
    assert facts.split == 15  # steps 0-14 high-noise (t >= 900 at shift 5)
    for stream in (t.cond, t.uncond):  # the expert change is the outlier ratio, as in the T2V table
        assert len(stream) == 40 and stream[0] == 1.0
        assert min(range(1, 35), key=lambda i: stream[i]) == facts.split and stream[facts.split] < 0.92
    as_t2v = a14b_facts(40, "wan22-i2v-a14b-40step", "WanPipeline")  # the same schedule in a T2V pipeline
    assert as_t2v.task == "t2v" and not t.matches(as_t2v)
    assert clip_schedule(as_t2v, MagSettings(0.06, 2, 0.1)).table is None
    assert not shipped().matches(facts)


@pytest.mark.parametrize(("threshold", "k", "retention"), [(0.06, 2, 0.1), (0.04, 2, 0.2), (0.12, 3, 0.1)])
@pytest.mark.parametrize("steps", [40, 30])
def test_the_i2v_schedule_is_the_authors_i2v_rule(threshold, k, retention, steps):
    t = i2v_table()
    facts = a14b_facts(steps, "wan22-i2v-a14b-40step", "WanImageToVideoPipeline")
    settings = MagSettings(threshold, k, retention)
    sched = clip_schedule(facts, settings)
    ours = {(s, i) for i, name in enumerate(("cond", "uncond")) for s in sched.skips[name]}
    cond = [t.cond[i] for i in nearest_indices(40, steps)]
    uncond = [t.uncond[i] for i in nearest_indices(40, steps)]
    theirs = authors_rule([x for p in zip(cond, uncond) for x in p][2:], steps, facts.split, threshold, k,
                          retention, mode="i2v")
    assert sched.table == "wan22-i2v-a14b-40step" and ours == theirs and ours
    assert all(s >= facts.split for s, _ in ours)  # the high-noise expert never skips


def test_the_authors_i2v_example_skips_in_the_low_noise_expert_only():
    """`mag:0.06:2:0.1`, MagCache4Wan2.2's I2V-A14B command, at the 40-step recipe."""
    sched = clip_schedule(a14b_facts(40, "wan22-i2v-a14b-40step", "WanImageToVideoPipeline"),
                          MagSettings(0.06, 2, 0.1))
    skipped = {s for name in ("cond", "uncond") for s in sched.skips[name]}
    assert sched.table == "wan22-i2v-a14b-40step" and min(skipped) > 15 and sched.skipped_forwards() > 0


@pytest.mark.parametrize("target", [1, 4, 8, 30, 40, 50, 79])
def test_resampling_is_the_authors_nearest_interp(target):
    src = np.arange(40, dtype=float)
    scale = (40 - 1) / (target - 1) if target > 1 else 0
    theirs = [39] if target == 1 else np.round(np.arange(target) * scale).astype(int).tolist()
    assert nearest_indices(40, target) == theirs == [int(src[i]) for i in nearest_indices(40, target)]


def test_a_schedule_without_a_table_skips_nothing():
    facts = ScheduleFacts("unipc", 5.0, 0.9, 40, 20)  # the I2V recipe's schedule: not calibrated here
    sched = clip_schedule(facts, MagSettings(0.5, 4, 0.1))
    assert sched.table is None and sched.skipped_forwards() == 0


@pytest.mark.parametrize(("value", "parsed", "text"), [
    ("mag:0.06", StepCache("mag", 0.06, 2, 0.2), "mag:0.06:2:0.2"),
    ("mag:0.06:2:0.4", StepCache("mag", 0.06, 2, 0.4), "mag:0.06:2:0.4"),
    (" mag:1:8:0 ", StepCache("mag", 1.0, 8, 0.0), "mag:1:8:0"),
    ("mag:0.1:3", StepCache("mag", 0.1, 3, 0.2), "mag:0.1:3:0.2")])
def test_mag_values_parse(value, parsed, text):
    assert StepCache.parse(value) == parsed and str(parsed) == text and StepCache.parse(text) == parsed


def test_refused_with_context_parallel():
    with pytest.raises(RuntimePlanError, match=r"step_cache=mag:0.06:2:0.2 cannot run with parallel=ulysses:2 "
                                               r"\(a skipped forward bypasses the split at the first block\)"):
        RuntimePlan(arch="hopper", gemm_backend="hopper-fp8", parallel="ulysses:2", step_cache="mag:0.06")


# ---------------------------------------------------------------- on the tiny pipeline

def tiny_table(ratio: float = 0.995) -> MagTable:
    """A calibration for the tiny recipe's schedule (UniPC, shift 3, boundary 0.875): every
    ratio `ratio` (the tiny model's random weights have no calibration of their own)."""
    return MagTable("tiny-test", "unipc", 3.0, 0.875, STEPS, (1.0,) + (ratio,) * (STEPS - 1),
                    (1.0,) + (ratio,) * (STEPS - 1))


@pytest.fixture(scope="module")
def pipe(tiny_nvfp4_checkpoint):
    return tiny_cpu_pipe(tiny_nvfp4_checkpoint)


def latents(pipe, steps: int = STEPS):
    """The clip's final latents (guided, both experts), and the block counts of the clip."""
    return guided_latents(pipe, steps)


def put(pipe, settings: MagSettings, table: MagTable | None):
    from gpubake.provisioning.mag_cache import apply_mag_cache

    return apply_mag_cache(pipe, settings, available=[table] if table is not None else [])


def test_the_hook_skips_the_schedules_forwards_and_runs_no_block_in_them(pipe):
    base, full = latents(pipe)
    keys = set(pipe.transformer.state_dict())
    settings = MagSettings(0.05, 2, 0.2)
    try:
        done = put(pipe, settings, tiny_table())
        assert done["transformer"] == {"step_cache": "mag:0.05:2:0.2", "cached_blocks": BLOCKS,
                                       "mag_tables": ["tiny-test"]}
        assert isinstance(pipe.transformer.blocks, MagBlocks) and set(pipe.transformer.state_dict()) == keys
        assert len(list(pipe.transformer.blocks)) == BLOCKS  # outside a forward: the blocks
        cached, counts = latents(pipe)
        expected = clip_schedule(ScheduleFacts("unipc", 3.0, 0.875, STEPS, 3), settings, [tiny_table()])
        stats = mag_stats(pipe)
        skipped = sum(stats.skipped.values())
        assert skipped == expected.skipped_forwards() > 0
        assert sum(stats.computed.values()) == 2 * STEPS - skipped
        assert counts.forwards == full.forwards  # every forward still enters the transformer...
        assert counts.total_blocks() == BLOCKS * (2 * STEPS - skipped)  # ...and a skipped one runs no block
        assert 0.0 < float((cached - base).norm() / base.norm()) < 0.25
        again, _ = latents(pipe)  # the pipeline reset the streams when the clip ended: the same clip
        assert torch.equal(again, cached)
    finally:
        apply_step_caches(pipe, "none")
    assert type(pipe.transformer.blocks) is torch.nn.ModuleList and set(pipe.transformer.state_dict()) == keys
    plain, counts = latents(pipe)
    assert torch.equal(plain, base) and counts.total_blocks() == full.total_blocks()


def test_nothing_skipped_is_bit_exact(pipe):
    base, _ = latents(pipe)
    try:
        put(pipe, MagSettings(1e-9, 2, 0.2), tiny_table())
        out, _ = latents(pipe)
        stats = mag_stats(pipe)
    finally:
        apply_step_caches(pipe, "none")
    assert sum(stats.skipped.values()) == 0 and sum(stats.computed.values()) == 2 * STEPS
    assert torch.equal(out, base)


def test_a_schedule_without_a_table_computes_every_forward_and_says_so(pipe, caplog):
    base, _ = latents(pipe)
    try:
        apply_runtime(pipe, plan_from_env("cpu", "step_cache=mag:0.5:4:0.1"))  # no shipped table is the tiny schedule's
        with caplog.at_level(logging.WARNING, logger="gpubake.provisioning.mag_cache"):
            out, _ = latents(pipe)
        stats = mag_stats(pipe)
    finally:
        apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert torch.equal(out, base) and sum(stats.skipped.values()) == 0 and sum(stats.computed.values()) == 2 * STEPS
    assert any("no magnitude ratios for this schedule (t2v, unipc, shift 3, boundary 0.875)" in r.getMessage()
               for r in caplog.records)


def test_the_plan_reports_it_and_none_takes_it_off(pipe):
    try:
        done = apply_runtime(pipe, plan_from_env("cpu", "step_cache=mag:0.06:2:0.4"))
        assert done["transformer"]["step_cache"] == done["transformer_2"]["step_cache"] == "mag:0.06:2:0.4"
        assert done["transformer"]["mag_tables"] == ["wan22-t2v-a14b-40step", "wan22-ti2v-5b-50step",
                                                     "wan22-i2v-a14b-40step"]
        done = apply_runtime(pipe, plan_from_env("cpu", "step_cache=fbc:0.2"))  # one cache replaces the other
        assert "mag_tables" not in done["transformer"] and mag_stats(pipe) is None
        assert type(pipe.transformer.blocks) is torch.nn.ModuleList and pipe.transformer.is_cache_enabled
    finally:
        done = apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert "step_cache" not in done["transformer"] and not pipe.transformer.is_cache_enabled


def test_a_clip_that_raised_hands_no_residual_to_the_next(pipe):
    """A clip that died mid-way leaves its streams' residuals (no pipeline reset), and the next
    clip is called without `render`'s reset: an expert's first forward computes anyway, even
    at retention 0, where the authors' rule would skip it."""
    table = MagTable("tiny-4", "unipc", 3.0, 0.875, 4, (1.0, .99, .99, .99), (1.0, .99, .99, .99))
    settings = MagSettings(0.05, 2, 0.0)
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
                generator=None, output_type="latent")
    try:
        put(pipe, settings, table)
        with torch.inference_mode():
            first = pipe("x", **{**call, "generator": torch.Generator().manual_seed(3)}).frames
            calls = []

            def boom(*_):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("stopped")
            h = pipe.transformer.register_forward_pre_hook(boom)
            with pytest.raises(RuntimeError):
                pipe("another prompt", **{**call, "generator": torch.Generator().manual_seed(4)})
            h.remove()
            assert pipe.transformer._diffusers_hook.get_hook("gpubake_mag_cache").shared.states._state_cache
            second = pipe("x", **{**call, "generator": torch.Generator().manual_seed(3)}).frames
        assert sum(mag_stats(pipe).skipped.values()) > 0
    finally:
        apply_step_caches(pipe, "none")
    assert torch.equal(first, second)


def test_a_computed_forward_keeps_the_residual_and_a_skipped_one_adds_it():
    from gpubake.provisioning.mag_cache import _Blocks, _StreamState

    calls = []

    def block(scale):
        def run(x, ctx):
            calls.append(scale)
            return x * scale + ctx
        return run

    state, x = _StreamState(), torch.tensor([1.0, 2.0])
    computed = _Blocks([block(2.0), block(3.0)], state, "transformer", skip=True)  # nothing to reuse yet
    y = computed(x, 1.0)
    assert torch.equal(y, (x * 2 + 1) * 3 + 1) and torch.equal(state.residual, y - x) and not computed.skipped
    skipped = _Blocks([block(2.0), block(3.0)], state, "transformer", skip=True)
    x2 = torch.tensor([5.0, 7.0])
    assert torch.equal(skipped(x2, 1.0), x2 + (y - x)) and skipped.skipped and calls == [2.0, 3.0]
    other = _Blocks([block(2.0)], state, "transformer_2", skip=True)  # another expert's residual: computes
    assert torch.equal(other(x2, 0.0), x2 * 2) and not other.skipped
    wrong = _Blocks([block(2.0)], state, "transformer_2", skip=True)  # a residual of another shape: computes
    assert torch.equal(wrong(torch.ones(3), 0.0), torch.full((3,), 2.0)) and not wrong.skipped


def test_compiled_blocks_stay_compiled_under_the_hook(pipe):
    """The plan compiles each block (`compile_blocks`); the hook calls those blocks as the
    transformer's loop did, so no block graph-breaks or recompiles for it (diffusers' own
    MagCache hook on every block is `torch.compiler.disable`d: its blocks would run eagerly)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    base_mag = None
    try:
        put(pipe, MagSettings(0.05, 2, 0.2), tiny_table())
        base_mag, _ = latents(pipe)
        for expert in (pipe.transformer, pipe.transformer_2):
            for b in expert.blocks:
                b.compile(backend="eager", dynamic=False)
        torch._dynamo.reset()
        counters.clear()
        first, _ = latents(pipe)
        frames = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        second, _ = latents(pipe)
        assert frames > 0 and counters["stats"]["unique_graphs"] == frames  # compiled once, reused
        assert breaks == 0
        assert torch.equal(first, base_mag) and torch.equal(second, base_mag)
        assert sum(mag_stats(pipe).skipped.values()) > 0
    finally:
        for expert in (pipe.transformer, pipe.transformer_2):
            for b in torch.nn.ModuleList.__iter__(expert.blocks):
                b._compiled_call_impl = None
        torch._dynamo.reset()
        apply_step_caches(pipe, "none")


def test_diffusers_own_magcache_still_disables_compile_on_every_block():
    """Why gpubake has its own hook (docs/selftest.md): diffusers 0.42.1's MagCache block hook is
    `torch.compiler.disable`d. If a diffusers upgrade drops that, its hook is worth another look."""
    from diffusers.hooks.mag_cache import MagCacheBlockHook

    from gpubake.provisioning.mag_cache import MagCacheHook

    assert getattr(MagCacheBlockHook.new_forward, "_torchdynamo_disable", False) is True
    assert not getattr(MagCacheHook.new_forward, "_torchdynamo_disable", False)


def test_a_residual_is_kept_only_for_a_forward_that_will_reuse_it(pipe):
    """No table for the schedule: nothing skips, so no branch holds a residual (0.34 GB each at
    480p) after any forward of the clip."""
    from gpubake.provisioning.mag_cache import HOOK

    try:
        put(pipe, MagSettings(0.05, 2, 0.2), None)
        shared = pipe.transformer._diffusers_hook.get_hook(HOOK).shared
        seen = []
        h = pipe.transformer_2.register_forward_hook(
            lambda *_: seen.append([s.residual is not None for s in shared.states._state_cache.values()]))
        latents(pipe)
        h.remove()
        assert seen and not any(any(x) for x in seen)
    finally:
        apply_step_caches(pipe, "none")


@contextlib.contextmanager
def stream_names_only(pipe):
    """The experts' cache contexts as diffusers' WanImageToVideoPipeline (0.42.1) sets them: the
    stream's name, no step index or step count."""
    from gpubake.provisioning.models import experts_of

    experts = list({id(m): m for m in experts_of(pipe).values()}.values())
    for model in experts:
        real = type(model).cache_context.__get__(model)

        @contextlib.contextmanager
        def names_only(name, _real=real, **_):
            with _real(name):
                yield

        model.cache_context = names_only
    try:
        yield
    finally:
        for model in experts:
            del model.cache_context


def test_without_a_step_index_the_schedulers_own_step_places_each_forward(pipe):
    """What the I2V pipeline gives the hook: the same skips and the same latents as with the
    step index, and a clip that died mid-way does not shift the next clip's steps."""
    settings = MagSettings(0.05, 2, 0.2)
    try:
        put(pipe, settings, tiny_table())
        told, _ = latents(pipe)
        told_stats = mag_stats(pipe).to_dict()
        put(pipe, settings, tiny_table())  # fresh counts
        with stream_names_only(pipe):
            counted, _ = latents(pipe)
            counted_stats = mag_stats(pipe).to_dict()
            def die_at_step_3(p, i, t, kw):
                if i == 2:
                    raise RuntimeError("a clip that died")
                return kw

            with pytest.raises(RuntimeError, match="died"), torch.inference_mode():
                pipe("a fox", height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=4.0,
                     guidance_scale_2=3.0, output_type="latent", callback_on_step_end=die_at_step_3)
            again, _ = latents(pipe)  # no reset between the two: the scheduler's step still lines up
    finally:
        apply_step_caches(pipe, "none")
    assert counted_stats == told_stats and sum(told_stats["skipped"].values()) > 0
    assert torch.equal(counted, told) and torch.equal(again, told)
