"""The model registry (models.toml)."""

from __future__ import annotations

import pytest

from gpubake.provisioning.models import ModelError, get_model, list_models


def test_registry_has_the_wan22_models():
    ids = {m.id for m in list_models()}
    assert ids == {"wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "tiny-wan2.2",
                   "wan2.2-t2v-a14b-lightx2v-4step"}


def test_a14b_entries_match_the_reference_configs():
    t2v, i2v = get_model("wan2.2-t2v-a14b"), get_model("wan2.2-i2v-a14b")
    assert t2v.source == "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert (t2v.boundary_ratio, t2v.flow_shift, t2v.num_inference_steps) == (0.875, 12.0, 40)
    assert (t2v.guidance_scale, t2v.guidance_scale_2) == (4.0, 3.0)
    assert (i2v.boundary_ratio, i2v.flow_shift, i2v.pipeline) == (0.9, 5.0, "WanImageToVideoPipeline")
    assert t2v.expert_dirs == ("transformer", "transformer_2")
    assert (t2v.height, t2v.width, t2v.num_frames, t2v.hidden_dim, t2v.num_layers) == (720, 1280, 81, 5120, 40)


def test_ti2v_is_a_single_expert():
    m = get_model("wan2.2-ti2v-5b")
    assert m.experts == 1 and m.boundary_ratio is None and m.expand_timesteps
    assert (m.height, m.width, m.num_frames, m.fps) == (704, 1280, 121, 24)


def test_tiny_matches_make_tiny():
    from gpubake.provisioning import tiny

    m = get_model(tiny.TINY_MODEL_ID)
    assert m.boundary_ratio == tiny.BOUNDARY_RATIO and m.flow_shift == tiny.FLOW_SHIFT
    assert m.num_layers == tiny.TRANSFORMER_CONFIG["num_layers"]
    assert m.hidden_dim == tiny.TRANSFORMER_CONFIG["num_attention_heads"] * tiny.TRANSFORMER_CONFIG["attention_head_dim"]


def test_unknown_model_id_is_one_line_with_the_known_ids():
    with pytest.raises(ModelError, match="unknown model id 'wan3'.*wan2.2-t2v-a14b") as exc:
        get_model("wan3")
    assert "\n" not in str(exc.value)
