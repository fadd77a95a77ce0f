"""The self-test loads the pipeline the service runs: weights plus the runtime plan of
$GPUBAKE_RUNTIME, shown in the render stage; a bad value is bad input (exit 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gpubake.cli import _run
from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning.runtime import plan_for, small_m_layers


def test_render_stage_reports_the_plan_and_what_was_applied(run_selftest, demo_spec, no_gpu, monkeypatch):
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    report = run_selftest(demo_spec, no_gpu)
    assert report.verdict == "pass"
    stages = json.loads(json.dumps(report.to_dict()))["stages"]  # as in the report file
    runtime = next(s for s in stages if s["name"] == "render")["values"]["runtime"]
    assert runtime["plan"] == dataclasses.asdict(plan_for("cpu"))  # unset: the CPU's measured (plain) plan
    assert set(runtime["applied"]) == {"transformer", "transformer_2", "vae"}  # the tiny pipeline has a VAE
    assert all(v == 0 for done in runtime["applied"].values() for v in done.values())


def test_attention_kernel_failing_its_check_is_a_warning_and_the_next_one_runs(run_selftest, demo_spec, no_gpu,
                                                                             monkeypatch):
    """A preferred kernel that fails its boot check (here: planted) is skipped, the render
    stage says so and which kernel ran, and the verdict is not a plain pass."""
    from gpubake.kernels import archs, attention_fp8
    from gpubake.provisioning import runtime

    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.setattr(archs, "CPU", dataclasses.replace(archs.CPU, attention=("fa3-fp8", "cudnn-fp8")))
    monkeypatch.setattr(attention_fp8, "cudnn_frontend_available", lambda: True)  # the CPU runs its reference
    monkeypatch.setattr(runtime, "_ATTENTION_CHECKS", {
        ("fa3-fp8", "cpu"): {"kernel": "fa3-fp8", "ok": False, "reason": "relative error 1.41 against its reference > 0.05"}})
    report = run_selftest(demo_spec, no_gpu)
    render = report.stage("render")
    assert render.status == "warn" and report.verdict != "pass"
    assert render.message.endswith("; fa3-fp8 attention failed its check (relative error 1.41 against its "
                                   "reference > 0.05), ran cudnn-fp8")
    runtime_values = render.values["runtime"]
    assert runtime_values["plan"]["attention"] == "cudnn-fp8"
    assert [(c["kernel"], c["ok"]) for c in runtime_values["attention_checks"]] == [("fa3-fp8", False), ("cudnn-fp8", True)]


def test_the_fused_qk_rope_failing_its_check_is_a_warning(run_selftest, demo_spec, no_gpu, monkeypatch):
    """A GPU where the fused Q/K norm + RoPE disagrees with its reference (planted: the CPU plan
    does not use it) renders through diffusers' path, and the render stage says so."""
    from gpubake.provisioning import runtime

    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.setattr(runtime, "_ATTENTION_CHECKS", {
        ("qk-norm-rope", "cpu"): {"kernel": "qk-norm-rope", "ok": False, "installed": True, "lever": "fuse_qk_rope",
                                  "reason": "12.5% of the values bit-equal (want >= 99%)"}})
    report = run_selftest(demo_spec, no_gpu)
    render = report.stage("render")
    assert render.status == "warn" and report.verdict != "pass"
    assert render.message.endswith("; qk-norm-rope (fuse_qk_rope) failed its check (12.5% of the values bit-equal "
                                   "(want >= 99%)), ran diffusers' own")
    assert render.values["runtime"]["plan"]["fuse_qk_rope"] is False


def test_override_reaches_both_experts(run_selftest, demo_spec, no_gpu, monkeypatch):
    monkeypatch.setenv("GPUBAKE_RUNTIME", "cache_small_m=1")
    report = run_selftest(demo_spec, no_gpu)
    assert report.verdict == "pass"
    runtime = report.stage("render").values["runtime"]
    assert runtime["plan"]["cache_small_m"] is True and runtime["plan"]["compile_blocks"] is False
    for name in ("transformer", "transformer_2"):
        expert = getattr(report.pipeline, name)
        cached = [n for n, m in expert.named_modules() if isinstance(m, NVFP4Linear) and m.keep_runtime_weight]
        assert cached == small_m_layers(expert) and cached  # exactly the text-context K/V projections
        assert runtime["applied"][name]["cached_small_m_layers"] == len(cached)


def test_compile_blocks_on_cpu_compiles_and_still_passes(run_selftest, demo_spec, no_gpu, monkeypatch):
    monkeypatch.setenv("GPUBAKE_RUNTIME", "compile_blocks=1")
    report = run_selftest(demo_spec, no_gpu)
    assert report.verdict == "pass", report.summary()
    applied = report.stage("render").values["runtime"]["applied"]
    blocks = report.pipeline.transformer.blocks
    assert applied["transformer"]["compiled_blocks"] == len(blocks) > 0
    assert all(b._compiled_call_impl is not None for b in blocks)


def test_bad_runtime_is_one_line_exit_2_before_any_stage(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_RUNTIME", "compile_block=1")
    report = tmp_path / "r.json"
    rc = _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path / "absent"), "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "GPUBAKE_RUNTIME='compile_block=1': 'compile_block=1' is not LEVER=VALUE" in " ".join(err.split())
    assert "Traceback" not in err and not report.exists()  # no stage ran: nothing hashed, nothing loaded
