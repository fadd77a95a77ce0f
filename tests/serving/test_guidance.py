"""Generation uses the model registry's settings (guidance per expert, the Wan negative
prompt, the expert boundary), not diffusers' defaults (guidance 5.0 for both experts)."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np

from gpubake.provisioning.models import get_model
from gpubake.provisioning.render import render

REQ = {"prompt": "a lighthouse at dusk", "size": "32x32", "frames": 5, "steps": 3, "seed": 5}


def _frames(path) -> np.ndarray:
    return iio.imread(path, extension=".mp4")


def test_the_service_renders_with_the_registry_settings(ready, tmp_path):
    tiny = get_model("tiny-wan2.2")
    assert (tiny.guidance_scale, tiny.guidance_scale_2, tiny.boundary_ratio) == (4.0, 3.0, 0.875)
    info = ready.get("/v1/info").json()["defaults"]
    assert info["guidance_scale"] == 4.0 and info["guidance_scale_2"] == 3.0 and info["boundary_ratio"] == 0.875
    assert info["negative_prompt"] == tiny.negative_prompt and tiny.negative_prompt.startswith("色调艳丽")

    job = ready.wait_job(ready.post("/v1/generate", json=REQ).json()["id"])
    assert job["status"] == "done", job
    served = _frames(ready.get(f"/v1/jobs/{job['id']}/video").content)

    pipe = ready.service.generator.pipeline
    assert pipe.config.boundary_ratio == tiny.boundary_ratio
    common = dict(prompt=REQ["prompt"], height=32, width=32, num_frames=5, steps=3, seed=5, fps=tiny.fps)
    same = render(pipe, out_dir=tmp_path / "registry", negative_prompt=tiny.negative_prompt, guidance_scale=4.0,
                  guidance_scale_2=3.0, **common)
    assert np.array_equal(served, _frames(same.video))
    # what the service did before: diffusers' defaults (5.0 for both experts, no negative prompt)
    before = render(pipe, out_dir=tmp_path / "diffusers", **common)
    assert not np.array_equal(served, _frames(before.video))
    # and each registry value matters on its own
    one_scale = render(pipe, out_dir=tmp_path / "one", negative_prompt=tiny.negative_prompt, guidance_scale=4.0,
                       **common)
    assert not np.array_equal(served, _frames(one_scale.video))


def test_an_explicit_negative_prompt_wins(ready):
    job = ready.post("/v1/generate", json={**REQ, "negative_prompt": ""}).json()
    assert job["request"]["negative_prompt"] == ""
    other = ready.post("/v1/generate", json={**REQ, "negative_prompt": "blurry"}).json()
    assert other["request"]["negative_prompt"] == "blurry"
    assert ready.wait_job(job["id"])["status"] == ready.wait_job(other["id"])["status"] == "done"
