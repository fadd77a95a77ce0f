"""$GPUBAKE_NVFP4_BACKEND reaches the layers and the report: the runtime plan binds the
backend it resolved to every NVFP4 layer once, and the self-test names the backend that ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpubake.cli import _run
from gpubake.kernels import backends, selfcheck
from gpubake.kernels.backends import CpuReference
from gpubake.kernels.linear import NVFP4Linear

EXPERTS = ("transformer", "transformer_2")


class CountingReference(CpuReference):
    """The CPU reference under a name of its own, counting its GEMMs: a second backend that
    runs on the CPU (every real alternative to `cpu-reference` needs CUDA)."""

    name = "cpu-reference-counting"

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, x, pw, bias=None):
        self.calls += 1
        return super().apply(x, pw, bias)


@pytest.fixture
def gemm_calls(monkeypatch):
    """Registers `CountingReference`; returns {backend name: GEMM calls so far}."""
    monkeypatch.setitem(backends.BACKENDS, CountingReference.name, CountingReference)
    monkeypatch.setattr(backends, "_instances", {})
    monkeypatch.setitem(selfcheck.TOLERANCE, CountingReference.name, selfcheck.TOLERANCE["cpu-reference"])
    default_calls = [0]
    real = CpuReference.apply

    def count_default(self, x, pw, bias=None):
        if type(self) is CpuReference:
            default_calls[0] += 1
        return real(self, x, pw, bias)

    monkeypatch.setattr(CpuReference, "apply", count_default)
    return lambda: {"cpu-reference": default_calls[0],
                    CountingReference.name: backends.get_backend(CountingReference.name).calls}


@pytest.mark.parametrize("override", [None, CountingReference.name])
def test_report_names_the_backend_the_layers_ran(run_selftest, demo_spec, no_gpu, monkeypatch, gemm_calls, override):
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    if override:
        monkeypatch.setenv(backends.ENV_VAR, override)
    else:
        monkeypatch.delenv(backends.ENV_VAR, raising=False)
    ran = override or "cpu-reference"  # the CPU's default in the arch table
    other = CountingReference.name if ran == "cpu-reference" else "cpu-reference"
    report = run_selftest(demo_spec, no_gpu)
    assert report.verdict == "pass", report.summary()
    stages = {s["name"]: s for s in json.loads(json.dumps(report.to_dict()))["stages"]}  # as in the report file
    assert stages["kernels"]["values"]["backend"] == ran
    assert stages["kernels"]["message"].startswith(f"backend {ran} matches the reference")
    runtime = stages["render"]["values"]["runtime"]
    assert runtime["plan"]["gemm_backend"] == ran
    layers = {e: [m for m in getattr(report.pipeline, e).modules() if isinstance(m, NVFP4Linear)] for e in EXPERTS}
    assert all(layers.values())
    assert runtime["gemm_backends"] == {e: {ran: len(layers[e])} for e in EXPERTS}
    assert {m.backend_name for ms in layers.values() for m in ms} == {ran}  # bound, each layer
    calls = gemm_calls()
    assert calls[ran] > sum(len(ms) for ms in layers.values())  # the render's GEMMs ran on it ...
    assert calls[other] == 0  # ... and none on the other one


def test_a_backend_the_device_cannot_run_fails_the_kernel_check(run_selftest, demo_spec, no_gpu, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "hopper-fp8")
    report = run_selftest(demo_spec, no_gpu)
    assert report.verdict == "fail"
    need = "GPUBAKE_NVFP4_BACKEND=hopper-fp8: needs sm_89, sm_90, but device cpu is cpu"
    assert need in report.stage("kernels").message
    assert report.stage("render").status == "skip"  # nothing rendered on a backend that cannot run


def test_unknown_backend_is_one_line_exit_2_before_any_stage(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fast-please")
    report = tmp_path / "r.json"
    rc = _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path / "absent"), "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "GPUBAKE_NVFP4_BACKEND: unknown backend 'fast-please'" in " ".join(err.split())
    assert "Traceback" not in err and not report.exists()
