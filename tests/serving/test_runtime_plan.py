"""The service runs the pipeline of `load_serving_pipeline` (weights + $GPUBAKE_RUNTIME's
plan) with or without a self-test, and refuses a bad value at startup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpubake.cli import _run
from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning.loader import load_pipeline
from gpubake.provisioning.runtime import small_m_layers


def _cached(expert: Any) -> list[str]:
    return [n for n, m in expert.named_modules() if isinstance(m, NVFP4Linear) and m.keep_runtime_weight]


def test_service_without_selftest_applies_the_plan_after_loading(make_service, monkeypatch):
    monkeypatch.setenv("GPUBAKE_RUNTIME", "cache_small_m=on")
    loads: list[tuple[Path, str]] = []

    def loader(path: Path, device: str) -> Any:
        loads.append((path, device))
        pipe = load_pipeline(path, device=device)
        assert not _cached(pipe.transformer)  # the plan comes after the weights
        return pipe

    service = make_service(selftest=False, device="cpu", pipeline_loader=loader)
    service.start()
    try:
        assert service.wait_settled(120) and service.phase == "ready", service.reason
    finally:
        service.stop()
    assert [d for _, d in loads] == ["cpu"]
    pipe = service.generator.pipeline
    for expert in (pipe.transformer, pipe.transformer_2):
        assert _cached(expert) == small_m_layers(expert) != []


def test_health_shows_the_selftest_runtime(ready):
    render = next(s for s in ready.get("/health").json()["selftest"]["stages"] if s["name"] == "render")
    assert render["values"]["runtime"]["plan"]["arch"] == "cpu"
    assert set(render["values"]["runtime"]["applied"]) == {"transformer", "transformer_2", "vae"}


@pytest.mark.parametrize("selftest", ["--selftest", "--no-selftest"])
def test_serve_refuses_a_bad_runtime_at_startup(selftest, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_RUNTIME", "attention=fast")
    rc = _run(["serve", "--dry-run", selftest, "--image", "demo", "--model-dir", str(tmp_path),
               "--report", str(tmp_path / "r.json")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "GPUBAKE_RUNTIME='attention=fast'" in err and "attention='fast'" in err
    assert "serving" not in err and "Traceback" not in err


def test_runpod_worker_refuses_a_bad_runtime_in_one_line(tmp_path: Path, monkeypatch, demo_facts_file: Path):
    from gpubake.provisioning.serving import runpod_handler

    for key, value in {"GPUBAKE_RUNTIME": "compile_blocks=maybe", "GPUBAKE_IMAGE_FACTS": str(demo_facts_file),
                       "GPUBAKE_MODEL_DIR": str(tmp_path), "GPUBAKE_REPORT": str(tmp_path / "r.json")}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=r"^error: GPUBAKE_RUNTIME='compile_blocks=maybe': compile_blocks='maybe' "
                                         r"is not a boolean"):
        runpod_handler.main()
