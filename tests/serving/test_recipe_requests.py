"""The service samples with the image's recipe; a request may override steps and guidance
within bounds. Forwards are counted on the served pipeline's experts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FOUR = "lightx2v-4step-t2v"
REQ = {"prompt": "a lighthouse at dusk", "size": "32x32", "frames": 5, "seed": 5}


@pytest.fixture(scope="module")
def four_step(tmp_path_factory: pytest.TempPathFactory, tiny_nvfp4_checkpoint: Path, serve_service: Any) -> Iterator[Any]:
    """The demo image's service, its facts naming the 4-step recipe (as image.json may)."""
    from gpubake.images.catalog import find
    from gpubake.images.render import image_facts
    from gpubake.provisioning.serving.build import build_service

    facts = image_facts(find("demo"), "runpod")
    facts = facts.model_copy(update={"model": facts.model.model_copy(update={"recipe": FOUR})})
    root = tmp_path_factory.mktemp("serve4")
    service = build_service(facts=facts, model_dir=tiny_nvfp4_checkpoint, report_path=root / "selftest.json",
                            data_dir=root / "out")
    with serve_service(service) as served:
        assert served.wait_phase("ready", "failed")["status"] == "ready"
        yield served


class Counted:
    def __init__(self, served: Any) -> None:
        pipe = served.service.generator.pipeline
        self.calls: list[str] = []
        self.handles = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, n=n: self.calls.append(n))
                        for n in ("transformer", "transformer_2")]

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _done(served: Any, body: dict[str, Any]) -> dict[str, Any]:
    r = served.post("/v1/generate", json=body)
    assert r.status_code == 202, r.text
    job = served.wait_job(r.json()["id"])
    assert job["status"] == "done", job
    return job


def test_the_4step_service_renders_4_forwards_without_cfg(four_step):
    defaults = four_step.get("/v1/info").json()["defaults"]
    assert defaults["steps"] == 4 and defaults["guidance_scale"] == 1.0 and defaults["guidance_scale_2"] == 1.0
    assert defaults["recipe"]["name"] == FOUR and defaults["recipe"]["timesteps"] == [1000, 750, 500, 250]
    assert defaults["recipe"]["fixed_steps"] and not defaults["recipe"]["cfg"]
    with Counted(four_step) as c:
        job = _done(four_step, REQ)
    assert c.calls == ["transformer", "transformer", "transformer_2", "transformer_2"]
    assert (job["request"]["steps"], job["request"]["guidance_scale"], job["request"]["guidance_scale_2"]) == (4, 1.0, 1.0)
    assert job["result"]["recipe"] == FOUR


def test_a_fixed_schedule_refuses_another_step_count(four_step):
    r = four_step.post("/v1/generate", json={**REQ, "steps": 8})
    assert r.status_code == 422 and r.json()["field"] == "steps"
    assert "fixed 4-step schedule (recipe lightx2v-4step-t2v); got 8" in r.json()["error"]
    assert _done(four_step, {**REQ, "steps": 4})["request"]["steps"] == 4


def test_guidance_may_be_asked_for_within_bounds(four_step):
    with Counted(four_step) as c:
        job = _done(four_step, {**REQ, "guidance_scale": 3})  # one scale: both experts
    assert len(c.calls) == 8 and (job["request"]["guidance_scale"], job["request"]["guidance_scale_2"]) == (3.0, 3.0)
    for bad, field in (({"guidance_scale": 25.0}, "guidance_scale"), ({"guidance_scale": 0.5}, "guidance_scale"),
                       ({"guidance_scale_2": True}, "guidance_scale_2"), ({"guidance_scale": "4"}, "guidance_scale")):
        r = four_step.post("/v1/generate", json={**REQ, **bad})
        assert r.status_code == 422 and field in r.json()["error"], (bad, r.text)
    # no CFG for the high-noise expert means none for the low-noise one in diffusers: refused, not ignored
    r = four_step.post("/v1/generate", json={**REQ, "guidance_scale_2": 3.0})
    assert r.status_code == 422 and r.json()["field"] == "guidance_scale_2"
    assert "runs only when guidance_scale > 1 (got 1.0)" in r.json()["error"]


def test_the_cfg_recipe_runs_two_forwards_a_step_unless_a_request_turns_guidance_off(ready):
    defaults = ready.get("/v1/info").json()["defaults"]
    assert defaults["recipe"]["name"] == "tiny-4step" and defaults["recipe"]["cfg"]
    with Counted(ready) as c:
        _done(ready, {**REQ, "steps": 3})
    assert len(c.calls) == 6
    with Counted(ready) as c:
        job = _done(ready, {**REQ, "steps": 3, "guidance_scale": 1.0, "guidance_scale_2": 1.0})
    assert len(c.calls) == 3 and job["request"]["guidance_scale_2"] == 1.0
    with Counted(ready) as c:
        job = _done(ready, {**REQ, "steps": 3, "guidance_scale_2": 2.0})  # the other expert keeps the recipe's
    assert (job["request"]["guidance_scale"], job["request"]["guidance_scale_2"]) == (4.0, 2.0) and len(c.calls) == 6


def test_a_request_may_truncate_cfg_and_the_job_says_how(ready, four_step):
    assert ready.get("/v1/info").json()["defaults"]["recipe"]["cfg_until"] is None  # the recipe's: every step
    with Counted(ready) as c:
        job = _done(ready, {**REQ, "steps": 3, "cfg_until": 0.5})  # 0.5 x 3 rounds up: 2 guided steps
    assert len(c.calls) == 2 * 2 + 1 and job["request"]["cfg_until"] == 0.5 and job["result"]["cfg_steps"] == 2
    with Counted(ready) as c:
        job = _done(ready, {**REQ, "steps": 3})
    assert len(c.calls) == 6 and job["request"]["cfg_until"] is None and job["result"]["cfg_steps"] == 3
    for bad in (1.5, -0.1, True, "0.5"):
        r = ready.post("/v1/generate", json={**REQ, "cfg_until": bad})
        assert r.status_code == 422 and "cfg_until" in r.json()["error"], (bad, r.text)
    # the 4-step recipe runs no CFG: nothing to truncate, refused rather than ignored
    r = four_step.post("/v1/generate", json={**REQ, "cfg_until": 0.5})
    assert r.status_code == 422 and r.json()["field"] == "cfg_until"
    assert "guidance_scale 1.0 runs none" in r.json()["error"]


def test_a_request_may_ask_for_a_step_cache_and_the_job_says_what_ran(ready, monkeypatch):
    from gpubake.provisioning import mag_cache
    from gpubake.provisioning.mag_cache import MagSettings, MagTable, clip_schedule, schedule_facts
    from gpubake.provisioning.step_cache import applied_step_cache

    pipe = ready.service.generator.pipeline
    assert ready.get("/v1/info").json()["defaults"]["magcache_table"] is None  # no shipped table is the tiny recipe's
    r = ready.post("/v1/generate", json={**REQ, "step_cache": "mag:0.04"})  # no calibration for the tiny recipe
    assert r.status_code == 422 and r.json()["field"] == "step_cache"
    assert r.json()["error"] == ("step_cache: MagCache has no calibration for this model's recipe tiny-4step "
                                 "(calibrated: wan22-t2v-a14b-40step, wan22-ti2v-5b-50step, wan22-i2v-a14b-40step)")
    tiny = MagTable("tiny-4", "unipc", 3.0, 0.875, 4, (1.0, .99, .99, .99), (1.0, .99, .99, .99))
    monkeypatch.setattr(mag_cache, "tables", lambda: (tiny,))  # a calibration for the tiny recipe's schedule
    defaults = ready.get("/v1/info").json()["defaults"]
    assert defaults["step_cache"] == "none" and defaults["magcache_table"] == "tiny-4"  # the service's plan
    job = _done(ready, {**REQ, "step_cache": "mag:0.5:2:0"})
    expected = clip_schedule(schedule_facts(pipe, 4), MagSettings(0.5, 2, 0.0)).skipped_forwards()
    assert job["request"]["step_cache"] == job["result"]["step_cache"] == "mag:0.5:2:0"
    assert job["result"]["forwards_skipped"] == expected > 0
    assert str(applied_step_cache(pipe)) == "none"  # the next request gets the service's again
    plain = _done(ready, REQ)
    assert plain["request"]["step_cache"] == plain["result"]["step_cache"] == "none"
    assert plain["result"]["forwards_skipped"] is None
    assert _done(ready, {**REQ, "step_cache": "mag:0.04"})["request"]["step_cache"] == "mag:0.04:2:0.2"  # normalised
    for bad in ("mag", "mag:0", "mag:0.1:9", "fbc:0.1", "fbc:0.1:2", "taylor:0.1", "none;rm -rf /", 0.04, True,
                "m" * 41):
        r = ready.post("/v1/generate", json={**REQ, "step_cache": bad})
        assert r.status_code == 422 and "step_cache" in r.json()["error"] and "\n" not in r.json()["error"], (bad, r.text)


def test_a_group_that_splits_each_clip_refuses_a_requests_step_cache():
    from gpubake.provisioning.models import get_model
    from gpubake.provisioning.serving.generate import RequestRejected
    from gpubake.provisioning.serving.groups import GroupGenerator
    from gpubake.provisioning.serving.limits import Limits
    from gpubake.provisioning.serving.schemas import GenerateRequest

    gen = GroupGenerator(get_model("tiny-wan2.2"), Limits(max_pixel_frames=10**9, max_pixel_frame_steps=10**12,
                                                          max_steps=100, basis="test"), True)
    with pytest.raises(RequestRejected) as exc:
        gen.resolve(GenerateRequest(prompt="a fox", step_cache="mag:0.04"))
    assert exc.value.field == "step_cache" and "splits each clip across a group of GPUs" in str(exc.value)
    assert gen.resolve(GenerateRequest(prompt="a fox", step_cache="none")).step_cache == "none"
    assert gen.resolve(GenerateRequest(prompt="a fox")).step_cache == "none"


def test_magcache_has_a_calibration_for_the_registrys_reference_recipes_only():
    from gpubake.provisioning.mag_cache import table_for_model
    from gpubake.provisioning.models import get_model

    def table(model_id: str) -> str | None:
        m = get_model(model_id)
        t = table_for_model(m, one_expert=m.experts == 1)
        return t.id if t else None

    assert [table(m) for m in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "tiny-wan2.2",
                                  "wan2.2-t2v-a14b-lightx2v-4step")] == [
        "wan22-t2v-a14b-40step", "wan22-i2v-a14b-40step", "wan22-ti2v-5b-50step", None, None]


def test_a_service_that_runs_first_block_cache_keeps_it_for_every_request():
    """fbc's hooks sit on the compiled blocks: a request turning it off or swapping it would
    recompile them, so a service that runs it refuses a request's own step cache."""
    from types import SimpleNamespace

    from gpubake.provisioning.models import get_model
    from gpubake.provisioning.serving.generate import Generator, RequestRejected
    from gpubake.provisioning.serving.limits import Limits
    from gpubake.provisioning.serving.schemas import GenerateRequest
    from gpubake.provisioning.step_cache import StepCache

    pipe = SimpleNamespace(_gpubake_step_cache=StepCache("fbc", 0.2))  # what apply_step_caches records
    gen = Generator(pipe, get_model("tiny-wan2.2"), Limits(10**9, 10**12, 100, "test"))
    assert gen.resolve(GenerateRequest(prompt="a fox")).step_cache == "fbc:0.2"
    for asked in ("none", "mag:0.04"):
        with pytest.raises(RequestRejected) as exc:
            gen.resolve(GenerateRequest(prompt="a fox", step_cache=asked))
        assert exc.value.field == "step_cache" and "runs fbc:0.2 on every clip" in str(exc.value)
