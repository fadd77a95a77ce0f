"""The RunPod serverless handler: the same service code, called directly and through the
`runpod` package's own local test mode (`--test_input`) in a subprocess."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio

from gpubake.provisioning.serving.runpod_handler import make_handler


def test_handler_renders_and_rejects(make_service):
    service = make_service()
    service.start()
    handler = make_handler(service)
    out = handler({"id": "job-1", "input": {"prompt": "a boat at sea", "size": "64x64", "frames": 5, "steps": 2,
                                            "seed": 11}})
    assert "error" not in out, out
    video = base64.b64decode(out["video_base64"])
    assert out["mime_type"] == "video/mp4" and video[4:8] == b"ftyp"
    assert iio.imread(video, extension=".mp4").shape[:3] == (5, 64, 64)
    assert out["request"]["seed"] == 11 and out["result"]["steps"] == 2
    assert handler({"id": "j2", "input": {"prompt": "x", "frames": 6}})["error"].startswith("input.frames: must be 4k+1")
    assert handler({"id": "j3", "input": {}})["error"] == "input.prompt: Field required"
    assert "serves at most" in handler({"id": "j4", "input": {"prompt": "x", "size": "2048x2048"}})["error"]
    service.stop()


def test_handler_refuses_after_failed_selftest(make_service):
    from gpubake.smoke_tests.probe import ProbeResult

    class NoGpu:
        def probe(self):
            return ProbeResult([], "no driver")

        def throttle_reasons(self, index):
            return []

    service = make_service(image="wan22-t2v-a14b-nvfp4-hopper", probe=NoGpu())
    service.start()
    out = make_handler(service)({"id": "j", "input": {"prompt": "x"}})
    assert out["error"].startswith("generation disabled on this machine: self-test failed: gpu: no GPU")


def test_runpod_local_test_mode(tiny_nvfp4_checkpoint: Path, tmp_path: Path, demo_facts_file: Path):
    env = {
        **os.environ,
        "GPUBAKE_IMAGE_FACTS": str(demo_facts_file),
        "GPUBAKE_MODEL_DIR": str(tiny_nvfp4_checkpoint),
        "GPUBAKE_REPORT": str(tmp_path / "selftest.json"),
        "GPUBAKE_OUTPUT_DIR": str(tmp_path / "out"),
    }
    job = {"input": {"prompt": "a bird", "size": "32x32", "frames": 5, "steps": 1, "seed": 1}, "id": "local-1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpubake.provisioning.serving.runpod_handler", "--test_input", json.dumps(job)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Job local-1 completed successfully" in log
    assert (tmp_path / "out" / "jobs" / "local-1" / "video.mp4").stat().st_size > 0
    assert json.loads((tmp_path / "selftest.json").read_text())["verdict"] == "pass"


def test_large_clip_goes_to_s3_as_a_presigned_url(make_service, moto_s3):
    import requests

    from gpubake.provisioning.serving.runpod_handler import Outputs

    service = make_service(selftest=False, device="cpu")
    service.start()
    try:
        job = {"id": "big-1", "input": {"prompt": "a long river", "size": "64x64", "frames": 9, "steps": 1, "seed": 3}}
        # over the inline limit, no bucket configured: a clear error, not a payload RunPod drops
        small = Outputs(inline_max_chars=100)
        out = make_handler(service, small)(job)
        assert out["error"].startswith("output: the clip is ")
        assert "set GPUBAKE_OUTPUT_S3=s3://bucket/prefix" in out["error"]
        # with a bucket: uploaded, a presigned URL back, no base64
        outputs = Outputs(s3_uri=f"s3://{moto_s3.bucket}/clips", endpoint_url=moto_s3.endpoint, inline_max_chars=100)
        out = make_handler(service, outputs)(job)
        assert "error" not in out, out
        assert "video_base64" not in out and out["video_s3"] == f"s3://{moto_s3.bucket}/clips/big-1.mp4"
        assert out["video_url_expires_in"] == 24 * 3600 and "X-Amz-Signature=" in out["video_url"]
        fetched = requests.get(out["video_url"], timeout=30)
        assert fetched.status_code == 200 and fetched.content == service.video_path(service.get("big-1")).read_bytes()
        assert iio.imread(fetched.content, extension=".mp4").shape[:3] == (9, 64, 64)
        head = moto_s3.client.head_object(Bucket=moto_s3.bucket, Key="clips/big-1.mp4")
        assert head["ContentType"] == "video/mp4"
        # a small clip stays inline even with a bucket configured
        inline = Outputs(s3_uri=f"s3://{moto_s3.bucket}/clips", endpoint_url=moto_s3.endpoint)
        out = make_handler(service, inline)({"id": "small-1", "input": {**job["input"], "frames": 1}})
        assert out["video_base64"] and "video_url" not in out
    finally:
        service.stop()


def test_bad_output_settings_fail_the_cold_start():
    import pytest

    from gpubake.errors import GpubakeError
    from gpubake.provisioning.serving.runpod_handler import Outputs

    with pytest.raises(GpubakeError, match="not an s3:// URI"):
        Outputs.from_env({"GPUBAKE_OUTPUT_S3": "https://bucket/x"})
    with pytest.raises(GpubakeError, match="GPUBAKE_INLINE_MAX_BYTES: must be a whole number of bytes, got '10MB'"):
        Outputs.from_env({"GPUBAKE_INLINE_MAX_BYTES": "10MB"})
    assert Outputs.from_env({"GPUBAKE_OUTPUT_S3": "s3://b/p", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}) == Outputs(
        s3_uri="s3://b/p", endpoint_url="http://127.0.0.1:9")
