"""The runtime plan's ``step_cache`` lever (issue 18): diffusers' First Block Cache on each
expert. On the tiny NVFP4 model (CPU reference backend), block evaluations counted with
forward hooks on the blocks' feed-forwards; outputs compared with the uncached clip's."""

from __future__ import annotations

import pytest
import torch
from testutil import guided_latents, tiny_cpu_pipe

from gpubake.provisioning.models import get_recipe
from gpubake.provisioning.runtime import RuntimePlan, RuntimePlanError, apply_runtime, plan_from_env
from gpubake.provisioning.sampling import apply_recipe
from gpubake.provisioning.step_cache import StepCache, StepCacheError, apply_step_caches, count_blocks

STEPS = 8
BLOCKS = 3  # tiny.TRANSFORMER_CONFIG num_layers
# measured on the tiny model at 8 guided steps (seed 1): fbc:0.2 evaluates 24 of 48 blocks, its
# latents 1.4 % off the uncached ones; fbc:0.02 skips nothing and is exact. Bound: 3 %.
BOUND = 0.03


@pytest.fixture(scope="module")
def pipe(tiny_nvfp4_checkpoint):
    return tiny_cpu_pipe(tiny_nvfp4_checkpoint)


def latents(pipe, steps: int = STEPS):
    """The clip's final latents (guided, both experts), and the block counts of the clip."""
    return guided_latents(pipe, steps)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("value, parsed", [("none", StepCache()), ("fbc:0.1", StepCache("fbc", 0.1)),
                                           (" fbc:1 ", StepCache("fbc", 1.0))])
def test_values_parse(value, parsed):
    assert StepCache.parse(value) == parsed and str(parsed) in ("none", "fbc:0.1", "fbc:1")


@pytest.mark.parametrize("value", ["fbc", "fbc:", "fbc:0", "fbc:1.5", "fbc:nan", "fbc:x", "fbc:0.1:2", "taylorseer:5", "",
                                   "mag", "mag:", "mag:0", "mag:1.5", "mag:0.1:0", "mag:0.1:9", "mag:0.1:2.5",
                                   "mag:0.1:2:1", "mag:0.1:2:-0.1", "mag:0.1:2:0.2:1", "mag:x", "mag:0.1:x"])
def test_a_bad_value_is_one_line_naming_the_variable(value):
    with pytest.raises(StepCacheError):
        StepCache.parse(value)
    with pytest.raises(RuntimePlanError) as exc:
        plan_from_env("cpu", f"step_cache={value}")
    msg = str(exc.value)
    assert msg.startswith(f"GPUBAKE_RUNTIME='step_cache={value}': runtime plan ") and "\n" not in msg
    assert "none | fbc:THRESHOLD | mag:THRESHOLD[:K[:RETENTION]] (THRESHOLD in (0, 1]" in msg


def test_off_by_default_selectable_and_refused_with_context_parallel():
    assert plan_from_env("cpu", "auto").step_cache == "none" and plan_from_env("cpu", "plain").step_cache == "none"
    assert plan_from_env("cpu", "step_cache=fbc:0.05,vae_tiling=1").step_cache == "fbc:0.05"
    with pytest.raises(RuntimePlanError, match=r"step_cache=fbc:0.1 cannot run with parallel=ulysses:2"):
        RuntimePlan(arch="hopper", gemm_backend="hopper-fp8", parallel="ulysses:2", step_cache="fbc:0.1")


def test_the_cache_skips_blocks_within_the_bound_and_none_is_exact(pipe):
    base, full = latents(pipe)
    assert full.forwards == {"transformer": 2 * 3, "transformer_2": 2 * 5}  # 8 guided steps: 3 high-noise, 5 low
    assert full.total_blocks() == BLOCKS * full.total_forwards()

    done = apply_runtime(pipe, plan_from_env("cpu", "step_cache=fbc:0.2"))
    assert done["transformer"]["step_cache"] == done["transformer_2"]["step_cache"] == "fbc:0.2"
    assert done["transformer"]["cached_blocks"] == BLOCKS - 1
    cached, counts = latents(pipe)
    assert counts.forwards == full.forwards  # the cache skips blocks, not forwards
    assert counts.total_blocks() < 0.6 * full.total_blocks()
    # every forward still runs its first block; the first step of each expert and context runs all
    assert counts.total_blocks() >= counts.total_forwards() + (BLOCKS - 1) * 4
    assert 0.0 < rel(cached, base) < BOUND
    again, _ = latents(pipe)  # the pipeline reset the cache when the clip ended: the same clip again
    assert torch.equal(again, cached)

    done = apply_runtime(pipe, plan_from_env("cpu", "plain"))  # step_cache=none takes the hooks off
    assert "step_cache" not in done["transformer"] and not pipe.transformer.is_cache_enabled
    plain, counts = latents(pipe)
    assert torch.equal(plain, base) and counts.total_blocks() == full.total_blocks()


def test_a_threshold_below_every_change_skips_nothing_and_changes_nothing(pipe):
    base, full = latents(pipe)
    apply_step_caches(pipe, "fbc:0.02")
    try:
        out, counts = latents(pipe)
    finally:
        apply_step_caches(pipe, "none")
    assert counts.total_blocks() == full.total_blocks() and torch.equal(out, base)


def test_a_clip_that_raised_leaves_no_cached_residual_for_the_next(pipe, tmp_path):
    """`render` resets the caches before a clip: one that died mid-way (no pipeline reset)
    does not feed the next its residuals."""
    from gpubake.provisioning.render import render
    from gpubake.provisioning.step_cache import reset_step_caches

    apply_runtime(pipe, plan_from_env("cpu", "step_cache=fbc:0.2"))
    try:
        first = render(pipe, "x", 64, 64, 5, 4, 3, tmp_path / "a", recipe=get_recipe("tiny-4step"))
        with count_blocks(pipe) as c:  # a clip stopped after its second forward, as an error would
            def boom(*_):
                if c.total_forwards() >= 2:
                    raise RuntimeError("stopped")
            h = pipe.transformer.register_forward_pre_hook(boom)
            with pytest.raises(RuntimeError), torch.inference_mode():
                pipe("x", height=64, width=64, num_frames=5, num_inference_steps=4, output_type="latent")
            h.remove()
        states = [s for b in pipe.transformer.blocks[:1] for s in b._diffusers_hook.hooks.values()]
        assert any(h.state_manager._state_cache for h in states)  # the dead clip's state is still there
        reset_step_caches(pipe)
        assert not any(h.state_manager._state_cache for h in states)
        second = render(pipe, "x", 64, 64, 5, 4, 3, tmp_path / "b", recipe=get_recipe("tiny-4step"))
        assert first.first_frame.read_bytes() == second.first_frame.read_bytes()
    finally:
        apply_runtime(pipe, plan_from_env("cpu", "plain"))


def test_it_composes_with_the_plans_cpu_levers(tiny_nvfp4_checkpoint, monkeypatch, tmp_path):
    """Through the service's loader: the cache with the small-M weight cache, the shrunk text
    encoder and the tiled VAE; reported in the plan and in `applied`; within the bound of the
    same plan without it."""
    from gpubake.provisioning.pipeline import load_serving_pipeline

    monkeypatch.setenv("GPUBAKE_RUNTIME", "step_cache=fbc:0.2,cache_small_m=1,text_encoder=shrink,vae_tiling=1")
    sp = load_serving_pipeline(tiny_nvfp4_checkpoint, "cpu")
    sp.pipe.set_progress_bar_config(disable=True)
    apply_recipe(sp.pipe, get_recipe("tiny-4step"))
    rt = sp.runtime()
    assert rt["plan"]["step_cache"] == "fbc:0.2" and rt["plan"]["vae_tiling"] and rt["plan"]["cache_small_m"]
    applied = rt["applied"]
    assert applied["transformer"]["step_cache"] == "fbc:0.2" and applied["transformer"]["cached_small_m_layers"] > 0
    assert applied["vae"] == {"tiling": 1, "channels_last": 0, "conv_pad": 0, "fused_norm": 0, "compiled_decoder": 0} and "text_encoder" in applied
    cached, counts = latents(sp.pipe)
    apply_step_caches(sp.pipe, "none")
    uncached, full = latents(sp.pipe)
    assert counts.total_blocks() < full.total_blocks() and 0.0 < rel(cached, uncached) < BOUND



def test_forwards_without_block_evaluations_are_reported_as_not_counted_not_as_all_skipped():
    """The H200 run of 2026-12-01 printed "blocks skipped 100 %" for clips with no cache at all:
    its blocks were compiled by inductor before the hooks were added, and no hook fired inside
    their graphs (with the CPU's eager dynamo backend they do fire, so this is the report alone)."""
    from gpubake.provisioning.step_cache import BlockCounts

    d = BlockCounts({"transformer": 0, "transformer_2": 0}, {"transformer": 2, "transformer_2": 2}).to_dict(40)
    assert d["blocks_skipped_fraction"] is None and "compiled blocks" in d["blocks_not_counted"]
    d = BlockCounts({"transformer": 60, "transformer_2": 80}, {"transformer": 2, "transformer_2": 2}).to_dict(40)
    assert d["blocks_skipped_fraction"] == 0.125 and "blocks_not_counted" not in d
    assert BlockCounts({}, {}).to_dict(40)["blocks_skipped_fraction"] is None


def test_a_clips_own_step_cache_runs_for_that_clip_then_the_plans_again(pipe, tmp_path, monkeypatch):
    """`render(step_cache=...)`, a request's choice: on for that clip, reported, and the plan's
    cache back afterwards, also after a clip that raised."""
    from gpubake.provisioning import mag_cache
    from gpubake.provisioning.mag_cache import MagTable, clip_schedule, has_mag_cache, schedule_facts
    from gpubake.provisioning.render import RenderError, render
    from gpubake.provisioning.step_cache import applied_step_cache, step_cache_for_clip

    tiny = MagTable("tiny-4", "unipc", 3.0, 0.875, 4, (1.0, .99, .99, .99), (1.0, .99, .99, .99))
    monkeypatch.setattr(mag_cache, "tables", lambda: (tiny,))  # the tiny schedule's calibration
    recipe = get_recipe("tiny-4step")
    apply_runtime(pipe, plan_from_env("cpu", "step_cache=fbc:0.2"))  # the plan's own
    try:
        plain = render(pipe, "x", 64, 64, 5, 4, 3, tmp_path / "a", recipe=recipe)
        fast = render(pipe, "x", 64, 64, 5, 4, 3, tmp_path / "b", recipe=recipe, step_cache="mag:0.5:2:0")
        expected = clip_schedule(schedule_facts(pipe, 4), mag_cache.MagSettings(0.5, 2, 0.0)).skipped_forwards()
        assert fast.step_cache == "mag:0.5:2:0" and fast.forwards_skipped == expected > 0
        assert plain.step_cache == "fbc:0.2" and plain.forwards_skipped is None
        assert str(applied_step_cache(pipe)) == "fbc:0.2" and pipe.transformer.is_cache_enabled
        assert not has_mag_cache(pipe.transformer)
        again = render(pipe, "x", 64, 64, 5, 4, 3, tmp_path / "c", recipe=recipe)
        assert again.first_frame.read_bytes() == plain.first_frame.read_bytes()
        assert fast.first_frame.read_bytes() != plain.first_frame.read_bytes()
        with pytest.raises(RuntimeError, match="died"), step_cache_for_clip(pipe, "mag:0.04") as used:
            assert str(used) == "mag:0.04:2:0.2" and has_mag_cache(pipe.transformer)
            raise RuntimeError("a clip that died")
        assert str(applied_step_cache(pipe)) == "fbc:0.2" and not has_mag_cache(pipe.transformer)
        with pytest.raises(RenderError, match=r"^step_cache='mag:2': one of none \| fbc"):
            render(pipe, "x", 64, 64, 5, 4, 3, tmp_path / "d", recipe=recipe, step_cache="mag:2")
        assert not (tmp_path / "d").exists()
    finally:
        apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert str(applied_step_cache(pipe)) == "none"
