"""The whole self-test on the CPU with the tiny NVFP4 model, and each injected fault
giving its verdict. Faults go in behind the GpuProbe interface (or the model files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpubake.smoke_tests.report import EXIT_CODES


def statuses(report) -> dict[str, str]:
    return {s.name: s.status for s in report.stages}


def test_gpu_image_on_healthy_h100_passes(run_selftest, gpu_spec, fake_gpu, write_table):
    # Reference of 1000 s/step: any real machine is within it.
    report = run_selftest(gpu_spec, fake_gpu(), table_path=write_table(1000.0, 1000.0))
    assert report.verdict == "pass", report.summary()
    assert report.exit_code == 0
    assert statuses(report) == {**dict.fromkeys(["gpu", "kernels", "model", "render", "throughput"], "pass"),
                                "gpus": "skip"}  # one GPU: nothing to all-reduce with
    gpu = report.stage("gpu")
    assert gpu.values["gpus"][0]["arch"] == "sm_90"
    assert "H100" in gpu.message and "580.95.05" in gpu.message
    render = report.stage("render")
    video, frame = Path(render.values["video"]), Path(render.values["first_frame"])
    assert video.stat().st_size > 0 and frame.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tp = report.stage("throughput")
    assert tp.values["expected"]["name"] == "H100 SXM" and tp.values["ratio"] < 1
    assert tp.values["seconds_per_step"] > 0 and tp.values["end_to_end_seconds"] >= tp.values["seconds_per_step"]


def test_no_gpu_on_gpu_image_fails_and_skips_render(run_selftest, gpu_spec, no_gpu):
    report = run_selftest(gpu_spec, no_gpu)
    assert report.verdict == "fail" and report.exit_code == EXIT_CODES["fail"]
    s = statuses(report)
    assert s["gpu"] == "fail" and s["kernels"] == "skip" and s["render"] == "skip" and s["throughput"] == "skip"
    assert s["model"] == "pass"  # still checked: the report says what is fine
    assert "no GPU" in report.stage("gpu").message and "sm_89, sm_90" in report.stage("gpu").message


def test_no_gpu_on_cpu_ok_image_is_cpu_mode_pass(run_selftest, demo_spec, no_gpu):
    report = run_selftest(demo_spec, no_gpu, device=None)
    assert report.verdict == "pass", report.summary()
    assert report.mode == "cpu"
    assert "CPU mode" in report.stage("gpu").message
    assert "no reference for CPU" in report.stage("throughput").message


def test_cpu_ok_gpu_image_without_gpu_says_cpu_mode(run_selftest, gpu_spec, no_gpu):
    spec = gpu_spec.model_copy(update={"cpu_ok": True})
    report = run_selftest(spec, no_gpu, device=None)
    assert report.verdict == "pass"
    assert report.stage("gpu").message.startswith("no GPU (NVML unavailable")
    assert report.stage("gpu").message.endswith("CPU mode (image is cpu_ok)")


def test_old_driver_fails(run_selftest, gpu_spec, fake_gpu):
    report = run_selftest(gpu_spec, fake_gpu(driver_version="535.104.05"))
    assert report.verdict == "fail"
    msg = report.stage("gpu").message
    assert "driver 535.104.05 too old" in msg and "CUDA 13.0 needs >= 580.95.05" in msg
    assert statuses(report)["render"] == "skip"


def test_driver_only_under_minor_compat_degrades(run_selftest, gpu_spec, fake_gpu, write_table):
    report = run_selftest(gpu_spec, fake_gpu(driver_version="580.65.06"), table_path=write_table(1000.0, 1000.0))
    assert report.verdict == "degraded" and report.exit_code == 1
    assert report.stage("gpu").status == "warn" and "minor-version" in report.stage("gpu").message
    assert report.stage("render").status == "pass"  # a warning does not stop the render


def test_wrong_arch_fails(run_selftest, gpu_spec, fake_gpu):
    report = run_selftest(gpu_spec, fake_gpu(name="NVIDIA GeForce RTX 3090", compute_capability=(8, 6)))
    assert report.verdict == "fail"
    assert "wrong arch: sm_86 is not among the image's sm_89, sm_90" in report.stage("gpu").message


def test_compatible_lower_minor_arch_passes(run_selftest, fake_gpu, gpu_spec, write_table):
    # An image built for sm_86 runs on an sm_89 card (cubins are compatible within a major).
    spec = gpu_spec.model_copy(update={"gpu_archs": ["sm_86"]})
    report = run_selftest(spec, fake_gpu(name="NVIDIA L40S", compute_capability=(8, 9)))
    assert report.stage("gpu").status == "pass", report.stage("gpu").message
    assert report.stage("gpu").values["gpus"][0]["arch"] == "sm_89"


def test_uncorrected_ecc_fails_and_lifetime_ecc_degrades(run_selftest, gpu_spec, fake_gpu, write_table):
    table = write_table(1000.0, 1000.0)
    bad = run_selftest(gpu_spec, fake_gpu(ecc_uncorrected_volatile=2), table_path=table)
    assert bad.verdict == "fail" and "2 uncorrected ECC errors since boot" in bad.stage("gpu").message
    old = run_selftest(gpu_spec, fake_gpu(ecc_uncorrected_aggregate=5), table_path=table)
    assert old.verdict == "degraded"


def test_thermal_throttle_degrades(run_selftest, gpu_spec, fake_gpu, write_table):
    table = write_table(1000.0, 1000.0)
    idle = run_selftest(gpu_spec, fake_gpu(throttle_reasons=["hw_thermal_slowdown"]), table_path=table)
    assert idle.verdict == "degraded" and "throttled: hw_thermal_slowdown" in idle.stage("gpu").message
    under_load = run_selftest(gpu_spec, fake_gpu(after=["sw_power_cap", "hw_power_brake_slowdown"]), table_path=table)
    assert under_load.verdict == "degraded"
    assert "throttled under load: hw_power_brake_slowdown" in under_load.stage("throughput").message


def test_slow_throughput_fails_beyond_fail_factor(run_selftest, gpu_spec, fake_gpu, write_table):
    # The H100 row expects a microsecond a step; the CPU render is far slower.
    report = run_selftest(gpu_spec, fake_gpu(), table_path=write_table(1e-6, 1e-6))
    assert report.verdict == "fail"
    tp = report.stage("throughput")
    assert tp.status == "fail" and "FAR TOO SLOW" in tp.message and tp.values["ratio"] > 3


def test_slow_throughput_within_fail_factor_degrades(run_selftest, gpu_spec, fake_gpu, write_table):
    report = run_selftest(gpu_spec, fake_gpu(), table_path=write_table(1e-6, 1e-6, fail_factor=1e12))
    assert report.verdict == "degraded"
    assert report.stage("throughput").status == "warn" and "SLOW: beyond +30%" in report.stage("throughput").message


def test_unknown_gpu_is_reported_not_failed(run_selftest, gpu_spec, fake_gpu):
    report = run_selftest(gpu_spec, fake_gpu(name="NVIDIA Hypothetical X900"))
    assert report.verdict == "pass"
    tp = report.stage("throughput")
    assert "unknown GPU 'NVIDIA Hypothetical X900'" in tp.message and "expected" not in tp.values


@pytest.mark.parametrize("quick", [False, True])
def test_corrupt_model_file_fails(run_selftest, gpu_spec, fake_gpu, tiny_nvfp4_checkpoint, tmp_path, quick):
    model = tmp_path / "model"
    shutil.copytree(tiny_nvfp4_checkpoint, model)
    weights = sorted((model / "transformer").glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the hash can tell
    weights.write_bytes(bytes(data))
    report = run_selftest(gpu_spec, fake_gpu(), model_dir=model, quick=quick)
    assert report.verdict == "fail"
    model_stage = report.stage("model")
    assert model_stage.status == "fail" and "sha256 mismatch" in model_stage.message
    assert weights.relative_to(model).as_posix() in model_stage.message
    assert report.stage("render").status == "skip"


def test_truncated_and_missing_model_files_fail(run_selftest, gpu_spec, fake_gpu, tiny_nvfp4_checkpoint, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_nvfp4_checkpoint, model)
    (model / "model_index.json").unlink()
    vae = sorted((model / "vae").glob("*.safetensors"))[0]
    vae.write_bytes(vae.read_bytes()[:100])
    report = run_selftest(gpu_spec, fake_gpu(), model_dir=model, quick=True)
    problems = report.stage("model").values["problems"]
    assert "model_index.json: missing" in problems
    assert any(p.startswith(vae.relative_to(model).as_posix() + ": size 100 != manifest") for p in problems)
    missing = run_selftest(gpu_spec, fake_gpu(), model_dir=tmp_path / "nowhere")
    assert missing.verdict == "fail" and "model directory missing" in missing.stage("model").message


def test_wrong_model_in_image_fails(run_selftest, gpu_spec, fake_gpu):
    spec = gpu_spec.model_copy(update={"model": gpu_spec.model.model_copy(update={"id": "wan2.2-t2v-a14b"})})
    report = run_selftest(spec, fake_gpu())
    assert report.stage("model").status == "fail"
    assert "holds 'tiny-wan2.2', image expects 'wan2.2-t2v-a14b'" in report.stage("model").message


def test_sustained_reports_every_run_and_flags_spread(run_selftest, gpu_spec, fake_gpu, write_table):
    report = run_selftest(gpu_spec, fake_gpu(), sustained=3, table_path=write_table(1000.0, 1000.0, spread_tolerance=1e-12))
    tp = report.stage("throughput")
    assert tp.values["runs"] == 3 and len(tp.values["seconds_per_step_runs"]) == 3
    assert tp.values["spread"] > 0 and "unstable over 3 runs" in tp.message
    assert report.verdict == "degraded"
    assert len(report.stage("render").values["runs"]) == 3


def test_stage_over_its_time_limit_fails(run_selftest, gpu_spec, fake_gpu):
    import time

    def slow_loader(path, device):
        time.sleep(1.0)
        raise RuntimeError("never reached in time")

    report = run_selftest(gpu_spec, fake_gpu(), pipeline_loader=slow_loader, limits={"render": 0.2})
    render = report.stage("render")
    assert render.status == "fail" and render.message == "timed out after 0.2 s"
    assert render.seconds < 0.9 and report.stage("throughput").status == "skip"


def test_kernel_mismatch_fails(run_selftest, gpu_spec, fake_gpu):
    bad = {"backend": "hopper-fp8", "ok": False, "max_rel_error": 0.5, "tolerance": 0.06}
    report = run_selftest(gpu_spec, fake_gpu(), kernel_check=lambda device: bad)
    assert report.stage("kernels").status == "fail" and "hopper-fp8 disagrees" in report.stage("kernels").message
    assert report.stage("render").status == "skip"


def test_report_updates_while_running(run_selftest, demo_spec, no_gpu):
    report = run_selftest(demo_spec, no_gpu)
    states = report.updates
    assert states[0] == ("running", 0)
    assert [n for s, n in states if s == "running"] == [0, 1, 2, 3, 4, 5, 6]
    assert states[-1] == ("done", 6)
