"""Per-card ceilings: a request over what fits gets a 422 naming the limit, before it is
queued, never an out-of-memory error in the middle of a job."""

from __future__ import annotations

import pytest

from gpubake.provisioning.serving.limits import (
    GIB,
    HEADROOM_BYTES,
    pixel_frames_that_fit,
)

P480 = 480 * 832 * 81
P720 = 720 * 1280 * 81


def test_the_memory_bench_clip_just_fits_its_measured_peak():
    # docs/benchmarks.md: 480x832x81 with the small-card plan peaked 2.96 GiB over the
    # resident model (tiled decode +2.0 GiB, below the step's peak)
    step_peak = int(2.96 * GIB) + HEADROOM_BYTES
    assert P480 - 2 <= pixel_frames_that_fit(step_peak, vae_tiling=True) <= P480
    assert pixel_frames_that_fit(step_peak - GIB // 10, vae_tiling=True) < P480
    # untiled, the decode needed 8.88 GiB over resident: the same budget is far too small
    assert pixel_frames_that_fit(step_peak, vae_tiling=False) < P480 // 2
    assert P480 - 2 <= pixel_frames_that_fit(int(8.88 * GIB) + HEADROOM_BYTES, vae_tiling=False) <= P480


def test_cards_the_plan_targets():
    # H100 80 GB, full plan (encoder as loaded, untiled decode): ~28.2 GiB resident
    h100 = pixel_frames_that_fit(int((79.1 - 28.2) * GIB), vae_tiling=False)
    assert h100 > P720  # the model's own 720p default fits
    assert h100 < 1920 * 1088 * 121  # a 1080p, 121-frame clip does not
    # a 24 GB card with the small-card plan (20.54 GiB resident): less than 480p at 81 frames
    small = pixel_frames_that_fit(int((23.6 - 20.54) * GIB), vae_tiling=True)
    assert 480 * 832 * 49 < small < P480
    assert pixel_frames_that_fit(HEADROOM_BYTES // 2, vae_tiling=True) == 0


def test_configured_ceiling_is_a_422_naming_it(make_service, serve_service):
    service = make_service(selftest=False, device="cpu", max_pixel_frames=64 * 64 * 5)
    with serve_service(service) as s:
        s.wait_phase("ready")
        limits = s.get("/v1/info").json()["limits"]
        assert limits == {"max_pixel_frames": 20480, "max_pixel_frame_steps": 20480 * 4 * 2, "max_steps": 100,
                          "basis": "configured (--max-pixel-frames)"}
        assert s.get("/health").json()["limits"] == limits
        ok = s.post("/v1/generate", json={"prompt": "fits", "size": "64x64", "frames": 5, "steps": 1})
        assert ok.status_code == 202, ok.text
        r = s.post("/v1/generate", json={"prompt": "too long", "size": "64x64", "frames": 9})
        assert r.status_code == 422
        assert r.json() == {"error": "size: 64x64x9 frames is 36864 pixel-frames; this service serves at most 20480 "
                                     "(max_pixel_frames, configured (--max-pixel-frames))", "field": "size"}
        r = s.post("/v1/generate", json={"prompt": "too many steps", "size": "64x64", "frames": 5, "steps": 9})
        assert r.status_code == 422 and r.json()["field"] == "steps"
        assert "x 9 steps is 184320; this service serves at most 163840 (max_pixel_frame_steps)" in r.json()["error"]
        assert s.wait_job(ok.json()["id"])["status"] == "done"


def test_cpu_default_ceiling(ready):
    limits = ready.get("/v1/info").json()["limits"]
    assert limits["max_pixel_frames"] == 256 * 256 * 17
    assert limits["basis"] == "cpu: default ceiling (set --max-pixel-frames to change it)"
    r = ready.post("/v1/generate", json={"prompt": "x", "size": "256x272", "frames": 17})
    assert r.status_code == 422 and "(max_pixel_frames, cpu: default ceiling" in r.json()["error"]


@pytest.mark.parametrize("bad", ["0", "100"])
def test_max_pixel_frames_flag_checked(bad, tmp_path, capsys):
    from gpubake.cli import _run

    assert _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--host", "127.0.0.1",
                 "--max-pixel-frames", bad, "--dry-run"]) == 2
    assert f"--max-pixel-frames: must be at least 256 (one 16x16 frame), got {bad}" in capsys.readouterr().err
