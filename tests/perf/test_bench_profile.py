"""bench/profile_forward.py and bench/bench_qk_norm_rope.py on the CPU (tiny sizes, Triton's
interpreter): the device runs take the same paths, so they do not fail on one nobody ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import profile_forward as P  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'bench'}", "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("name, cls", [
    ("triton_tem_fused__to_copy_cat_flex_attention_full_slice_transpose_view_zeros_like_15", "attention (FlexAttention)"),
    ("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT", "GEMM (cuBLAS / CUTLASS)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128", "attention (FA3 / cuDNN / SDPA)"),
    ("_fp8_rowwise_kernel", "activation quantization (gpubake Triton)"),
    ("triton_red_fused__fused_rms_norm_add_copy_mul_slice_sub_unbind_view_4", "fused elementwise / norms (inductor)"),
    ("_qk_norm_rope_kernel", "other Triton"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda", "copies / fills"),
])
def test_the_h200_profiles_kernels_fall_in_their_classes(name, cls):
    """Names from the 720p profile of 2026-12-03 (bench/results/profile_forward_720p_h200.json)."""
    assert P.kernel_class(name) == cls


def test_profile_runs_each_plan_and_sums_the_kernels(tmp_path):
    out = tmp_path / "p.json"
    r = _run("profile_forward.py", "--device", "cpu", "--layers", "2", "--heads", "2", "--frames", "5", "--size", "32x32",
             "--text-len", "16", "--repeats", "1", "--json-out", str(out), "--runtime", "auto", "--runtime", "fuse_qk_rope=1")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["layers"] == 2 and got["tokens"] == 2 * 2 * 2  # 2 latent frames of 2 x 2 patches
    plain, fused = got["variants"]
    assert plain["variant"] == "32x32:auto" and fused["variant"] == "32x32:fuse_qk_rope=1"
    assert plain["applied"]["fused_qk_rope_modules"] == 0 and fused["applied"]["fused_qk_rope_modules"] == 2
    for v in (plain, fused):
        assert v["forward_ms"] > 0 and v["kernels_ms_per_forward"] > 0
        total = sum(c["ms_per_forward"] for c in v["classes"].values())
        assert abs(total - v["kernels_ms_per_forward"]) <= 0.02 * v["kernels_ms_per_forward"] + 0.05
        assert v["top_kernels"] and all(k["calls_per_forward"] > 0 for k in v["top_kernels"])


@pytest.mark.parametrize("bad, flag", [(["--runtime", "fuse_qk_rope=maybe"], "--runtime"),
                                       (["--size", "720"], "--size")])
def test_profile_refuses_bad_input_in_one_line_before_building(tmp_path, bad, flag):
    r = _run("profile_forward.py", "--device", "cpu", "--layers", "1", "--json-out", str(tmp_path / "p.json"), *bad)
    assert r.returncode == 2 and r.stderr.strip().startswith(flag) and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()


def test_qk_bench_times_each_variant_against_the_reference(tmp_path):
    out = tmp_path / "q.json"
    r = _run("bench_qk_norm_rope.py", "--device", "cpu", "--tokens", "40", "--heads", "2", "--block-r", "4,16",
             "--no-compile", "--json-out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    (size,) = json.loads(out.read_text())["sizes"]
    rows = {v["variant"]: v for v in size["variants"]}
    assert list(rows) == ["diffusers eager", "fused, 4 tokens a program", "fused, 16 tokens a program"]
    assert rows["diffusers eager"]["bit_equal_fraction"] == 1.0  # the reference itself
    for name in list(rows)[1:]:
        assert "error" not in rows[name] and rows[name]["ms"] > 0
        assert rows[name]["bit_equal_fraction"] >= 0.99 and rows[name]["max_abs_diff"] <= 2 ** -6


def test_norm_quant_bench_times_the_plan_and_the_fused_pass_per_norm(tmp_path):
    out = tmp_path / "n.json"
    r = _run("bench_norm_quant.py", "--device", "cpu", "--tokens", "24", "--dim", "256", "--json-out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    (size,) = json.loads(out.read_text())["sizes"]
    rows = {n["norm"]: n for n in size["norms"]}
    assert list(rows) == ["norm1", "norm2", "norm3"] and rows["norm1"]["consumers"] == 3
    for row in rows.values():
        assert "error" not in row and row["plan_ms"] > 0 and row["fused_ms"] > 0 and row["residual_equal"]
        assert row["codes_equal_fraction"] >= 0.999 and row["max_code_distance"] <= 1
    assert size["saved_ms_a_block"] == pytest.approx(sum(r["saved_ms"] for r in rows.values()), abs=1e-3)


@pytest.mark.parametrize("bad", [["--tokens", "24,x"], ["--dim", "0"]])
def test_norm_quant_bench_refuses_bad_input_in_one_line(tmp_path, bad):
    r = _run("bench_norm_quant.py", "--device", "cpu", "--json-out", str(tmp_path / "n.json"), *bad)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "n.json").exists()
