"""Sampling recipes (models.toml [recipes]) and what `render` does with them on the tiny model.

The 4-step recipe is LightX2V's step-distilled Wan 2.2 T2V-A14B recipe
(ModelTC/LightX2V f8aee98b, configs/wan22/extreme/wan_moe_t2v_distill_nvfp4_sparse_attn.json:
denoising_step_list [1000, 750, 500, 250], boundary_step_index 2, enable_cfg false,
sample_shift 5.0), sampled with diffusers' FlowMatchEulerDiscreteScheduler; the
reference below is LightX2V's Wan22StepDistillScheduler
(lightx2v/models/schedulers/wan/step_distill/scheduler.py), rewritten from its source.
"""

from __future__ import annotations

import pytest
import torch

from gpubake.provisioning.models import (
    ModelError,
    _parse_recipe,
    boundary_ratio_for_step,
    get_model,
    get_recipe,
    model_for,
)
from gpubake.provisioning.render import RenderError, render
from gpubake.provisioning.sampling import apply_recipe

FOUR = "lightx2v-4step-t2v"
FORTY = "wan22-t2v-a14b-40step"


def test_the_4step_recipe_is_lightx2vs_config():
    r = get_recipe(FOUR)
    assert (r.sampler, r.timesteps, r.shift, r.boundary_step) == ("euler", (1000, 750, 500, 250), 5.0, 2)
    assert (r.steps, r.fixed_steps, r.cfg, r.guidance_scale, r.guidance_scale_2) == (4, True, False, 1.0, 1.0)
    m = get_model("wan2.2-t2v-a14b-lightx2v-4step")
    assert m.recipe is r and m.num_inference_steps == 4 and m.experts == 2
    assert (m.source, m.base, m.import_format) == ("hf://lightx2v/Wan2.2-NVFP4-Sparse",
                                                   "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers", "lightx2v")
    # same architecture as the model it was distilled from
    base = get_model("wan2.2-t2v-a14b")
    assert (m.num_layers, m.hidden_dim, m.ffn_dim, m.pipeline) == (base.num_layers, base.hidden_dim, base.ffn_dim,
                                                                   base.pipeline)


def test_every_model_names_its_recipe_and_reads_its_sampling_from_it():
    t2v = get_model("wan2.2-t2v-a14b")
    assert t2v.recipe.name == FORTY and not t2v.recipe.fixed_steps and t2v.recipe.cfg
    assert (t2v.num_inference_steps, t2v.flow_shift, t2v.boundary_ratio) == (40, 12.0, 0.875)
    assert t2v.negative_prompt.startswith("色调艳丽")
    assert model_for("tiny-wan2.2", FOUR).recipe.name == FOUR and model_for("tiny-wan2.2").recipe.name == "tiny-4step"
    with pytest.raises(ModelError, match="unknown sampling recipe 'nope'"):
        model_for("tiny-wan2.2", "nope")
    with pytest.raises(ModelError, match="has an expert boundary, and the model has one expert"):
        model_for("wan2.2-ti2v-5b", FOUR)


def test_the_boundary_switches_exactly_after_step_2():
    r = get_recipe(FOUR)
    ts = [1000 * s for s in r.shifted_sigmas()]
    assert ts == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    # diffusers' WanPipeline: transformer (high noise) while t >= boundary_ratio * 1000
    assert [t >= r.boundary_ratio * 1000 for t in ts] == [True, True, False, False]
    assert [t >= boundary_ratio_for_step(r, 1) * 1000 for t in ts] == [True, False, False, False]
    assert [t >= boundary_ratio_for_step(r, 3) * 1000 for t in ts] == [True, True, True, False]


@pytest.mark.parametrize("entry, message", [
    ({"sampler": "dpm"}, "sampler must be one of unipc, euler"),
    ({"sampler": "unipc", "shift": 5.0, "guidance_scale": 4.0}, "steps must be a whole number"),
    ({"sampler": "unipc", "shift": 5.0, "guidance_scale": 4.0, "timesteps": [1000, 500]}, "need sampler = \"euler\""),
    ({"sampler": "euler", "shift": 5.0, "guidance_scale": 1.0, "timesteps": [500, 750]}, "strictly decreasing"),
    ({"sampler": "euler", "shift": 5.0, "guidance_scale": 1.0, "timesteps": [1000, 500], "steps": 2}, "not both"),
    ({"sampler": "euler", "shift": 5.0, "guidance_scale": 1.0, "guidance_scale_2": 1.0, "timesteps": [1000, 500],
      "boundary_step": 2}, "boundary_step must be a whole number in [1, 1]"),
    ({"sampler": "unipc", "shift": 5.0, "guidance_scale": 1.0, "guidance_scale_2": 3.0, "steps": 4,
      "boundary_ratio": 0.9}, "no unconditional pass"),
    ({"sampler": "unipc", "shift": 5.0, "guidance_scale": 0.5, "steps": 4}, "guidance_scale must be a number"),
    ({"sampler": "unipc", "shift": 5.0, "guidance_scale": 4.0, "steps": 4, "boundary_ratio": 0.9},
     "guidance_scale_2 goes with a boundary"),
    ({"sampler": "unipc", "shift": 5.0, "guidance_scale": 4.0, "steps": 4, "cfg": True}, "unknown field 'cfg'"),
])
def test_a_malformed_recipe_is_one_line_naming_it(entry, message):
    with pytest.raises(ModelError, match="models.toml: recipe 'bad': ") as exc:
        _parse_recipe("bad", entry)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- on the tiny model


def test_the_4step_recipe_runs_4_forwards_without_cfg_2_per_expert(pipe, forwards, tmp_path):
    res = render(pipe, "a fox in the snow", 64, 64, 5, 4, 1, tmp_path, recipe=get_recipe(FOUR))
    assert forwards.experts() == ["transformer", "transformer", "transformer_2", "transformer_2"]
    assert [t for _, t in forwards.calls] == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    assert res.recipe == FOUR and res.steps == 4 and res.video.is_file()
    assert type(pipe.scheduler).__name__ == "FixedScheduleEulerScheduler"


def test_the_40step_recipe_runs_two_forwards_a_step(pipe, forwards, tmp_path):
    render(pipe, "a fox in the snow", 64, 64, 5, 3, 1, tmp_path, recipe=get_recipe(FORTY))
    assert len(forwards.calls) == 6  # cond + uncond each step
    ts = [t for _, t in forwards.calls]
    assert ts[0::2] == ts[1::2]
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.flow_shift == 12.0
    assert pipe.config.boundary_ratio == 0.875


def test_recipes_follow_one_another_on_one_pipeline(pipe, forwards, tmp_path, tiny_checkpoint):
    import json

    checkpoint = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    render(pipe, "x", 64, 64, 5, 4, 1, tmp_path / "a", recipe=get_recipe(FOUR))
    render(pipe, "x", 64, 64, 5, 2, 1, tmp_path / "b", recipe=get_recipe(FORTY))
    # back on the checkpoint's own UniPC settings, at the recipe's shift
    sched = pipe.scheduler
    assert type(sched).__name__ == checkpoint["_class_name"] and sched.config.flow_shift == 12.0
    assert all(sched.config[k] == v for k, v in checkpoint.items() if not k.startswith("_") and k != "flow_shift")
    render(pipe, "x", 64, 64, 5, 4, 1, tmp_path / "c", recipe=get_recipe(FOUR))
    assert len(forwards.calls) == 4 + 2 * 2 + 4
    assert forwards.calls[8:] == forwards.calls[:4]  # the 4-step schedule again, exactly


def test_a_fixed_schedule_takes_only_its_own_step_count(pipe, forwards, tmp_path):
    with pytest.raises(RenderError, match=r"steps=8: recipe lightx2v-4step-t2v is a fixed 4-step schedule") as exc:
        render(pipe, "x", 64, 64, 5, 8, 1, tmp_path, recipe=get_recipe(FOUR))
    assert "\n" not in str(exc.value) and not forwards.calls


def test_the_4step_recipe_is_lightx2vs_sampler_step_for_step(pipe, forwards):
    """Run the pipeline with the recipe, record each forward's velocity, and replay
    LightX2V's Wan22StepDistillScheduler on them: the same latents come out."""
    recipe = get_recipe(FOUR)
    apply_recipe(pipe, recipe)
    start = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = pipe("a fox", height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=1.0,
                   guidance_scale_2=1.0, latents=start.clone(), output_type="latent").frames

    # LightX2V set_denoising_timesteps: sigmas = linspace(1, 0, 1001)[:-1], shifted, taken at 1000 - t
    shift, steps = 5.0, [1000, 750, 500, 250]
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    idx = [1000 - t for t in steps]
    timesteps, sigmas = (sigmas * 1000)[idx], sigmas[idx]
    assert [t for _, t in forwards.calls] == pytest.approx(timesteps.tolist(), abs=1e-3)
    # step_post: x0 = x - sigma * v; x = x0 + sigma_next * v (not after the last step); float32 latents
    x = start.to(torch.float32)
    for i, v in enumerate(forwards.outputs):
        x = x - sigmas[i].item() * v
        if i < len(steps) - 1:
            x = x + v * sigmas[i + 1].item()
    assert torch.allclose(out.float(), x, atol=1e-5, rtol=1e-5)
