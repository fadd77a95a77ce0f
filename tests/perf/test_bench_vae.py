"""The VAE decode benches run on the CPU (tiny config) and write what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_vae_conv  # noqa: E402
import bench_vae_decode  # noqa: E402


def test_vae_decode_bench_smoke(tmp_path):
    out = tmp_path / "vae.json"
    assert bench_vae_decode.main(["--small", "--json-out", str(out), "--sizes", "480p",
                                  "--variants", "eager,eager+cl,eager+pad", "--profile", "--conv-shapes"]) == 0
    got = json.loads(out.read_text())
    rows = got["sizes"]["480p"]["variants"]
    assert set(rows) == {"eager", "eager+cl", "eager+pad"} and rows["eager"]["rel_err"] == 0.0
    assert all(r["median_s"] > 0 and r["timed_frames_compiled"] == 0 for r in rows.values())
    prof = got["sizes"]["480p"]["profile"]
    assert prof["eager"]["kernel_s"] > 0 and prof["eager"]["top"] and prof["eager_conv_shapes"]


def test_vae_decode_bench_refuses_unknown_variants():
    with pytest.raises(SystemExit) as exc:
        bench_vae_decode.parse_args(["--json-out", "x", "--variants", "eager,fast"])
    assert exc.value.code == 2


def test_vae_conv_bench_formulations_agree(tmp_path):
    out = tmp_path / "conv.json"
    assert bench_vae_conv.main(["--small", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["variants"]
    assert set(rows) == {"ncdhw", "ndhwc", "pad128", "pad128-ndhwc", "fold2d"}
    assert all(r["rel_err_vs_ncdhw"] < 1e-5 and r["shape"] == rows["ncdhw"]["shape"] for r in rows.values())


def test_video_write_bench_smoke(tmp_path):
    import bench_video_write

    out = tmp_path / "vw.json"
    assert bench_video_write.main(["--small", "--json-out", str(out), "--repeats", "1"]) == 0
    rows = json.loads(out.read_text())["sizes"]["tiny"]
    assert set(rows) == set(bench_video_write.PRESETS)
    assert all(r["frames_read"] == 10 and r["bytes"] > 0 and r["psnr_db"] > 25 for r in rows.values())
