"""`gpubake selftest` as a user runs it: the real NVML probe (no GPU here), the demo
image, the report file, exit codes, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake.cli import _run


def _gpubake(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "gpubake"), *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_demo_selftest_passes_in_cpu_mode(tiny_nvfp4_checkpoint: Path, tmp_path: Path):
    report = tmp_path / "gpubake" / "selftest.json"
    proc = _gpubake("selftest", "--json", "--model-dir", str(tiny_nvfp4_checkpoint),
                    env={"GPUBAKE_IMAGE": "demo", "GPUBAKE_REPORT": str(report), "GPUBAKE_BOOT_EPOCH": "0",
                         "GPUBAKE_HOME": str(tmp_path / "home"), "TORCHINDUCTOR_CACHE_DIR": "", "TRITON_CACHE_DIR": "",
                         "GPUBAKE_PREFETCH": "on", "PYTORCH_CUDA_ALLOC_CONF": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    on_disk = json.loads(report.read_text())
    assert out == on_disk  # the --json object is the report file
    assert out["verdict"] == "pass" and out["state"] == "done" and out["mode"] == "cpu"
    assert [s["name"] for s in out["stages"]] == ["gpu", "gpus", "kernels", "model", "render", "throughput"]
    assert out["stages"][0]["values"]["probe_error"]  # the real NVML probe found no GPU here
    assert out["stages"][2]["values"]["backend"] == "cpu-reference"  # kernels, after gpu and gpus
    assert (report.parent / "selftest-clip" / "video.mp4").stat().st_size > 0
    assert out["boot_to_verdict_seconds"] > 1e9  # measured from the (fake) boot epoch 0
    assert "self-test PASS: image demo, cpu mode" in proc.stderr
    assert not list(report.parent.glob(".*partial*"))  # atomic writes left nothing behind
    render = out["stages"][4]["values"]
    # the checkpoint was read ahead, every file the manifest lists, once each; the compile
    # caches went to the volume's gpubake folder (start.sh's GPUBAKE_HOME)
    listed = json.loads((tiny_nvfp4_checkpoint / "gpubake-manifest.json").read_text())["files"]
    inodes = {(tiny_nvfp4_checkpoint / rel).stat().st_ino: entry["size"] for rel, entry in listed.items()}
    assert render["prefetch"] == {**render["prefetch"], "files": len(inodes), "bytes_read": sum(inodes.values()),
                                  "finished": True, "errors": []}
    phases = render["runtime"]["load_seconds"]  # where the load's time went, phase by phase
    assert sorted(phases) == ["apply_runtime", "experts_assign", "experts_build", "experts_wait", "other_components",
                              "pipeline_class", "to_device", "transformer", "transformer_2"]  # the overlapped load
    # the experts' reads ran in a thread beside other_components and to_device: the rest add up
    assert sum(v for k, v in phases.items() if k not in ("transformer", "transformer_2")) <= render["load_seconds"] + 0.01
    # the render stage's libraries were imported in the background while the model files hashed (the default)
    assert render["preimport"]["finished"] and render["preimport"]["errors"] == []
    cache = tmp_path / "home" / "compile-cache"
    assert render["compile_cache"] == {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    assert render["cuda_alloc_conf"] == "expandable_segments:True"  # provisioning.allocator, the user set none


def test_failed_verdict_exits_3_and_writes_report(tmp_path: Path):
    report = tmp_path / "r.json"
    rc = _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path / "absent"), "--report", str(report)])
    assert rc == 3
    data = json.loads(report.read_text())
    assert data["verdict"] == "fail" and "model directory missing" in data["summary"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image", "no-such-image"], "no-such-image"),
        (["--image", "demo", "--sustained", "0"], "--sustained: must be at least 1"),
        (["--image", "demo", "--device", "tpu"], "--device: must be cpu, cuda or cuda:N"),
        (["--image", "demo", "--table", "/nonexistent/t.json"], "/nonexistent/t.json: throughput table not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path: Path, capsys):
    report = tmp_path / "r.json"
    rc = _run(["selftest", "--model-dir", str(tmp_path), "--report", str(report), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in " ".join(err.split())
    assert "Traceback" not in err and not report.exists()


def test_no_image_anywhere_is_a_clear_error(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_IMAGE", raising=False)
    assert _run(["selftest", "--report", str(tmp_path / "r.json")]) == 2
    assert "pass --image NAME or --spec PATH, or set GPUBAKE_IMAGE" in capsys.readouterr().err


def test_broken_table_names_file_and_field(tmp_path: Path, capsys):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"schema_version": 1, "tolerance": -1, "fail_factor": 3, "spread_tolerance": 0.1,
                                 "models": {}}))
    assert _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path), "--table", str(table)]) == 2
    assert f"{table}: field tolerance: Input should be greater than 0" in " ".join(capsys.readouterr().err.split())
