"""CFG truncation (issue 18): a recipe's `cfg_until` keeps both CFG forwards for the first
steps only, through WanPipeline's own per-step `do_classifier_free_guidance`; on the tiny
model, counted with forward hooks on the experts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpubake.provisioning.cfg_truncation import CfgTruncationError, cfg_steps, check_cfg_until
from gpubake.provisioning.models import ModelError, _parse_recipe, get_recipe
from gpubake.provisioning.render import RenderError, render

TINY = "tiny-4step"  # guided (4.0 / 3.0), two experts, 4 steps
BASE = {"sampler": "unipc", "shift": 3.0, "guidance_scale": 4.0, "guidance_scale_2": 3.0, "boundary_ratio": 0.875,
        "steps": 4}


def _clip(pipe, tmp_path, name, **kw):
    import imageio.v2 as imageio

    res = render(pipe, "a fox in the snow", 64, 64, 5, kw.pop("steps", 4), 7, tmp_path / name, **kw)
    return res, np.asarray(imageio.imread(res.first_frame))


def test_cfg_steps_rounds_half_up_and_none_is_every_step():
    assert cfg_steps(None, 40) == 40 and cfg_steps(1.0, 40) == 40 and cfg_steps(0.0, 40) == 0
    assert [cfg_steps(0.7, 40), cfg_steps(0.75, 40), cfg_steps(0.5, 4), cfg_steps(0.3, 4)] == [28, 30, 2, 1]
    assert cfg_steps(0.125, 4) == 1  # 0.5 rounds up
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(CfgTruncationError, match=r"^cfg_until: must be a number in \[0, 1\]"):
            check_cfg_until(bad)


@pytest.mark.parametrize("value, message", [
    (1.5, "cfg_until must be a number in [0.0, 1.0], got 1.5"),
    ("half", "cfg_until must be a number in [0.0, 1.0], got 'half'"),
    (True, "cfg_until must be a number in [0.0, 1.0], got True"),
])
def test_a_bad_recipe_cfg_until_is_one_line_naming_the_field(value, message):
    with pytest.raises(ModelError) as exc:
        _parse_recipe("bad", {**BASE, "cfg_until": value})
    assert str(exc.value) == f"models.toml: recipe 'bad': {message}"


def test_cfg_until_without_guidance_is_refused_and_the_field_reaches_to_dict():
    with pytest.raises(ModelError, match=r"^models.toml: recipe 'bad': cfg_until truncates classifier-free "
                                         r"guidance, and guidance_scale 1.0 runs none$"):
        _parse_recipe("bad", {**BASE, "guidance_scale": 1.0, "guidance_scale_2": 1.0, "cfg_until": 0.5})
    r = _parse_recipe("ok", {**BASE, "cfg_until": 0.5})
    assert r.cfg_until == 0.5 and r.to_dict()["cfg_until"] == 0.5
    assert get_recipe(TINY).cfg_until is None and get_recipe(TINY).to_dict()["cfg_until"] is None  # default: off


@pytest.mark.parametrize("cfg_until, guided", [(0.5, 2), (0.75, 3), (0.25, 1), (0.0, 0)])
def test_truncated_cfg_runs_two_forwards_for_the_guided_steps_then_one(pipe, forwards, tmp_path, cfg_until, guided):
    recipe = dataclasses.replace(get_recipe(TINY), cfg_until=cfg_until)
    res, _ = _clip(pipe, tmp_path, "t", recipe=recipe)
    steps = 4
    assert len(forwards.calls) == 2 * guided + (steps - guided)
    assert res.cfg_steps == guided
    # the guided steps come first, each a conditional and an unconditional forward at the same t
    ts = [t for _, t in forwards.calls]
    guided_ts, rest = ts[: 2 * guided], ts[2 * guided:]
    assert guided_ts[0::2] == guided_ts[1::2] and len(set(rest)) == len(rest) == steps - guided
    # after the cutoff only the conditional context is fed (the prompt's, the first of each guided pair)
    contexts = forwards.contexts
    cond = contexts[0]
    assert all(c == cond for c in contexts[2 * guided:])


def test_cfg_until_one_is_todays_clip_bit_for_bit(pipe, forwards, tmp_path):
    r = get_recipe(TINY)
    base, frame0 = _clip(pipe, tmp_path, "base", recipe=r)
    n_base = len(forwards.calls)
    full, frame1 = _clip(pipe, tmp_path, "full", recipe=dataclasses.replace(r, cfg_until=1.0))
    assert n_base == 8 and len(forwards.calls) == 16  # two forwards each of the 4 steps, both clips
    assert base.cfg_steps == full.cfg_steps == 4
    assert np.array_equal(frame0, frame1)
    assert (tmp_path / "base" / "video.mp4").read_bytes() == (tmp_path / "full" / "video.mp4").read_bytes()


def test_truncation_changes_the_clip_and_the_next_clip_is_guided_again(pipe, forwards, tmp_path):
    r = get_recipe(TINY)
    _, guided = _clip(pipe, tmp_path, "a", recipe=r)
    _, cut = _clip(pipe, tmp_path, "b", recipe=r, cfg_until=0.5)  # the caller's cfg_until over the recipe's
    assert not np.array_equal(guided, cut)
    _, again = _clip(pipe, tmp_path, "c", recipe=r)  # _guidance_scale is set per call: nothing leaks
    assert np.array_equal(guided, again)
    assert len(forwards.calls) == 8 + 6 + 8


def test_no_guidance_ignores_cfg_until_and_a_bad_one_is_one_line(pipe, forwards, tmp_path):
    res, _ = _clip(pipe, tmp_path, "n", recipe=get_recipe(TINY), guidance_scale=1.0, guidance_scale_2=1.0,
                   cfg_until=0.5)
    assert len(forwards.calls) == 4 and res.cfg_steps == 0
    forwards.calls.clear()
    with pytest.raises(RenderError) as exc:
        _clip(pipe, tmp_path, "x", recipe=get_recipe(TINY), cfg_until=2.0)
    assert str(exc.value).startswith("cfg_until: must be a number in [0, 1]") and "\n" not in str(exc.value)
    assert not forwards.calls

