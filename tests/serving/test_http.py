"""The HTTP service over a real socket on loopback: health, generation, jobs, videos,
bad requests, and the self-test gate (in progress, failed)."""

from __future__ import annotations

import threading
from pathlib import Path

import imageio.v3 as iio
import pytest

from gpubake.provisioning.loader import load_pipeline
from gpubake.provisioning.models import get_model


def test_health_carries_the_passing_report(ready):
    r = ready.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["ready"] and body["verdict"] == "pass"
    assert body["selftest"]["state"] == "done" and body["selftest"]["mode"] == "cpu"
    assert [s["name"] for s in body["selftest"]["stages"]] == ["gpu", "gpus", "kernels", "model", "render", "throughput"]
    # the same report is on disk at the known path
    assert Path(ready.service.report_path).is_file()


def test_generate_job_video_round_trip(ready):
    r = ready.post("/v1/generate", json={"prompt": "a red fox in the snow", "size": "64x48", "frames": 5,
                                        "steps": 2, "seed": 7})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}" == job["status_url"]
    tiny = get_model("tiny-wan2.2")
    assert job["request"] == {"prompt": "a red fox in the snow", "negative_prompt": tiny.negative_prompt, "width": 64,
                              "height": 48, "frames": 5, "steps": 2, "seed": 7, "guidance_scale": 4.0,
                              "guidance_scale_2": 3.0, "cfg_until": None, "step_cache": "none"}  # resolved: every step guided, the service's step cache
    done = ready.wait_job(job["id"])
    assert done["status"] == "done", done
    assert done["result"]["steps"] == 2 and done["result"]["seconds_per_step"] > 0
    assert done["video_url"] == f"/v1/jobs/{job['id']}/video"
    video = ready.get(done["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"
    frames = iio.imread(video.content, extension=".mp4")
    assert frames.shape[0] == 5 and frames.shape[1:3] == (48, 64)


def test_same_seed_same_video_and_defaults_fill_in(ready):
    ids = [ready.post("/v1/generate", json={"prompt": "a cat", "seed": 3}).json()["id"] for _ in range(2)]
    jobs = [ready.wait_job(i) for i in ids]
    info = ready.get("/v1/info").json()
    w, h = map(int, info["defaults"]["size"].split("x"))
    assert jobs[0]["request"]["width"] == w and jobs[0]["request"]["frames"] == info["defaults"]["frames"]
    a, b = (iio.imread(ready.get(f"/v1/jobs/{i}/video").content, extension=".mp4") for i in ids)
    assert (a == b).all()
    random_seed = ready.post("/v1/generate", json={"prompt": "a cat"}).json()["request"]["seed"]
    assert isinstance(random_seed, int) and 0 <= random_seed < 2**32


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "prompt: missing required field"),
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"prompt": "x", "colour": "red"}, "colour: unknown field"),
        ({"prompt": "x", "size": "100x100"}, "size: width and height must be multiples of 16"),
        ({"prompt": "x", "size": "big"}, "size: must be WIDTHxHEIGHT like 832x480"),
        ({"prompt": "x", "frames": 6}, "frames: must be 4k+1"),
        ({"prompt": "x", "steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"prompt": "x", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"prompt": "x", "steps": "many"}, "steps: Input should be a valid integer"),
        ({"prompt": "x", "size": "1024x1024", "frames": 81}, "serves at most"),
        # strict types: no silent coercion of booleans, floats or numeric strings
        ({"prompt": "x", "frames": True}, "frames: Input should be a valid integer"),
        ({"prompt": "x", "steps": 2.0}, "steps: Input should be a valid integer"),
        ({"prompt": "x", "seed": "3"}, "seed: Input should be a valid integer"),
        ({"prompt": 5}, "prompt: Input should be a valid string"),
        ({"prompt": "x", "size": 64}, "size: Input should be a valid string"),
    ],
)
def test_bad_requests_get_one_line_422(ready, body, needle):
    r = ready.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]


def test_not_json_body(ready):
    r = ready.post("/v1/generate", data="{oops", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "body: not valid JSON"


@pytest.mark.parametrize(
    ("kw", "status", "message"),
    [
        ({"data": '{"prompt": "x"}', "headers": {"content-type": "text/plain"}}, 422,
         "body: must be a JSON object (Content-Type: application/json)"),
        ({"json": ["prompt", "x"]}, 422, "body: must be a JSON object (Content-Type: application/json)"),
        ({"json": None}, 422, "body: missing required field"),
        ({"data": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 422, "body: not valid JSON"),
    ],
)
def test_body_parse_errors_are_error_json(ready, kw, status, message):
    r = ready.post("/v1/generate", **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"] == message
    assert "detail" not in r.json()


def test_unknown_route_and_method_are_error_json(ready):
    r = ready.get("/v2/nothing")
    assert r.status_code == 404 and r.json() == {"error": "not found: GET /v2/nothing"}
    r = ready.get("/v1/generate")
    assert r.status_code == 405 and r.json() == {"error": "method not allowed: GET /v1/generate"}


def test_body_size_cap_413(ready):
    big = {"prompt": "x" * (70 * 1024)}
    r = ready.post("/v1/generate", json=big)
    assert r.status_code == 413 and r.json() == {"error": "body: larger than 65536 bytes"}

    def chunks():  # no Content-Length: counted as it is read
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    r = ready.post("/v1/generate", data=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json() == {"error": "body: larger than 65536 bytes"}
    # the prompt's own limit is a 422 below the cap
    r = ready.post("/v1/generate", json={"prompt": "x" * 2001})
    assert r.status_code == 422 and r.json()["error"].startswith("prompt: String should have at most 2000")


def test_unknown_job_404(ready):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/video"):
        r = ready.get(path)
        assert r.status_code == 404 and "no such job" in r.json()["error"]


def test_one_worker_queue_409_and_429(make_service, serve_service, hold_generator):
    service = make_service(max_queue=1)
    with serve_service(service) as s:
        s.wait_phase("ready")
        gate, started = hold_generator(service)
        first = s.post("/v1/generate", json={"prompt": "one", "steps": 1}).json()["id"]
        assert started.wait(30)
        second = s.post("/v1/generate", json={"prompt": "two", "steps": 1}).json()["id"]
        assert s.get(f"/v1/jobs/{first}").json()["status"] == "running"
        assert s.get(f"/v1/jobs/{second}").json()["status"] == "queued"
        r = s.get(f"/v1/jobs/{second}/video")
        assert r.status_code == 409 and f"job {second} is queued" in r.json()["error"]
        third = s.post("/v1/generate", json={"prompt": "three", "steps": 1})
        assert third.status_code == 429 and third.headers["Retry-After"] == "30"
        assert "queue full" in third.json()["error"]
        gate.set()
        assert s.wait_job(first)["status"] == "done" and s.wait_job(second)["status"] == "done"


def test_health_in_progress_then_ready(make_service, serve_service, tiny_nvfp4_checkpoint):
    gate = threading.Event()

    def slow_loader(path: Path, device: str):
        gate.wait(60)
        return load_pipeline(path, device=device)

    service = make_service(pipeline_loader=slow_loader)
    with serve_service(service) as s:
        body = s.wait_phase("selftest")
        r = s.get("/health")
        assert r.status_code == 503
        while not (body["selftest"] and body["selftest"]["stages"]):
            body = s.get("/health").json()
        assert body["selftest"]["state"] == "running" and body["verdict"] is None
        refused = s.post("/v1/generate", json={"prompt": "early"})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "10"
        assert "self-test in progress" in refused.json()["error"]
        gate.set()
        assert s.wait_phase("ready", "failed")["status"] == "ready"
        assert s.post("/v1/generate", json={"prompt": "now", "steps": 1}).status_code == 202


def test_failed_selftest_still_answers_health_and_refuses(make_service, serve_service):
    from gpubake.smoke_tests.probe import ProbeResult

    class NoGpu:
        def probe(self):
            return ProbeResult([], "NVML unavailable: no driver")

        def throttle_reasons(self, index):
            return []

    # The Hopper image (not cpu_ok) on a host without a GPU.
    service = make_service(image="wan22-t2v-a14b-nvfp4-hopper", probe=NoGpu())
    with serve_service(service) as s:
        body = s.wait_phase("failed")
        r = s.get("/health")
        assert r.status_code == 503 and body["verdict"] == "fail"
        assert body["reason"].startswith("self-test failed: gpu: no GPU (NVML unavailable: no driver)")
        assert body["selftest"]["stages"][0]["status"] == "fail"
        refused = s.post("/v1/generate", json={"prompt": "x"})
        assert refused.status_code == 503
        assert refused.json()["error"].startswith("generation disabled on this machine: self-test failed: gpu:")
        assert refused.json()["phase"] == "failed"
