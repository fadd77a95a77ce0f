"""The boot self-test of an image whose checkpoint is FP8 weights (`quantize --format fp8`):
the kernels stage checks the FP8 path the device runs, the model stage accepts format fp8,
and the render runs the FP8 layers bound to that path."""

from __future__ import annotations

import json

from gpubake.kernels.fp8_linear import FP8Linear

EXPERTS = ("transformer", "transformer_2")


def _fp8_facts(spec):
    return spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "fp8"})})


def test_fp8_image_passes_its_selftest(run_selftest, demo_spec, no_gpu, tiny_fp8_checkpoint, monkeypatch):
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.delenv("GPUBAKE_FP8_BACKEND", raising=False)
    report = run_selftest(_fp8_facts(demo_spec), no_gpu, model_dir=tiny_fp8_checkpoint)
    assert report.verdict == "pass", report.summary()
    stages = {s["name"]: s for s in json.loads(json.dumps(report.to_dict()))["stages"]}
    kernels = stages["kernels"]["values"]
    assert (kernels["format"], kernels["backend"], kernels["ok"]) == ("fp8", "reference", True)  # the CPU's path
    assert stages["model"]["values"]["format"] == "fp8"
    layers = {e: [m for m in getattr(report.pipeline, e).modules() if isinstance(m, FP8Linear)] for e in EXPERTS}
    assert all(len(v) == 30 for v in layers.values())
    assert stages["render"]["values"]["runtime"]["gemm_backends"] == {e: {"fp8:reference": 30} for e in EXPERTS}


def test_fp8_override_reaches_the_kernel_check_and_the_layers(run_selftest, demo_spec, no_gpu, tiny_fp8_checkpoint,
                                                              monkeypatch):
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "scaled-mm")
    report = run_selftest(_fp8_facts(demo_spec), no_gpu, model_dir=tiny_fp8_checkpoint)
    assert report.verdict == "pass", report.summary()
    assert report.stage("kernels").values["backend"] == "scaled-mm"
    assert {m.backend_name for e in EXPERTS for m in getattr(report.pipeline, e).modules()
            if isinstance(m, FP8Linear)} == {"scaled-mm"}


def test_an_fp8_checkpoint_in_an_nvfp4_image_fails_the_model_stage(run_selftest, demo_spec, no_gpu,
                                                                  tiny_fp8_checkpoint):
    report = run_selftest(demo_spec, no_gpu, model_dir=tiny_fp8_checkpoint)
    assert report.verdict == "fail"
    assert "format 'fp8', image expects 'nvfp4'" in report.stage("model").message


def test_unknown_fp8_backend_is_one_line_exit_2_before_any_stage(tmp_path, capsys, monkeypatch):
    from gpubake.cli import _run

    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "warp-speed")
    report = tmp_path / "r.json"
    rc = _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path / "absent"), "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "GPUBAKE_FP8_BACKEND: unknown backend 'warp-speed'" in " ".join(err.split())
    assert "Traceback" not in err and not report.exists()


def test_an_fp8_image_is_judged_by_nvfp4_rows_as_estimates(run_selftest, gpu_spec, fake_gpu, write_table,
                                                           tiny_fp8_checkpoint, monkeypatch):
    """The throughput table's measured rows were measured with NVFP4 checkpoints: for the FP8
    image they are estimates, so a clip far slower than one degrades the verdict, never fails it
    (the same row fails the NVFP4 image: test_selftest_faults)."""
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.delenv("GPUBAKE_FP8_BACKEND", raising=False)
    table = write_table(1e-6, 1e-6)  # the tiny H100 row, measured with NVFP4, a microsecond a step
    assert json.loads(table.read_text())["models"]["tiny-wan2.2"]["gpus"][0]["quantization"] == "nvfp4"
    report = run_selftest(_fp8_facts(gpu_spec), fake_gpu(), model_dir=tiny_fp8_checkpoint, table_path=table)
    tp = report.stage("throughput")
    assert tp.status == "warn" and report.verdict == "degraded", report.summary()
    assert tp.values["expected"]["source"] == "estimate"
    assert tp.values["expected"]["basis"].startswith("measured with nvfp4, not fp8: ")
    assert "the reference is an estimate: degraded, not failed" in tp.message
