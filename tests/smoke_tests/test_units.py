"""Small pieces of the self-test: throttle decoding, the table, verdicts, the report path,
and --quick sampling of the model files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from gpubake.smoke_tests import modelcheck
from gpubake.smoke_tests.expectations import SelfTestError, judge, load_table
from gpubake.smoke_tests.probe import GpuInfo, NvmlProbe, decode_throttle
from gpubake.smoke_tests.report import Report, StageResult, default_report_path, verdict_of


def test_decode_throttle_names_bits_and_keeps_unknown():
    assert decode_throttle(0) == []
    assert decode_throttle(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]
    assert decode_throttle(0x8 | 0x10000) == ["hw_slowdown", "unknown_0x10000"]


def test_nvml_probe_without_driver_reports_no_gpu_not_error():
    result = NvmlProbe().probe()  # this machine has no NVIDIA driver
    assert result.gpus == [] and result.error
    assert NvmlProbe().throttle_reasons(0) == []


def test_packaged_table_covers_the_issue_gpus_and_marks_sources():
    table = load_table()
    for model in ("tiny-wan2.2", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"):
        names = {r.name for r in table.models[model].gpus}
        assert {"H100 SXM", "H200", "A100", "L40S", "RTX 4090", "RTX 5090", "B200"} <= names
        assert all(r.source in ("measured", "estimate") and r.basis for r in table.models[model].gpus)
    # NVML names -> rows; the PCIe H100 must not pick up the SXM row
    assert table.lookup("wan2.2-t2v-a14b", "NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert table.lookup("wan2.2-t2v-a14b", "NVIDIA H100 PCIe").name == "H100 PCIe/NVL"
    assert table.lookup("wan2.2-t2v-a14b", "NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert table.lookup("wan2.2-t2v-a14b", "NVIDIA RTX 6000 Ada Generation") is None
    assert table.lookup("no-such-model", "NVIDIA H100 80GB HBM3") is None
    assert table.lookup("wan2.2-t2v-a14b", None) is None


def test_judge_thresholds():
    table = load_table()
    row = table.lookup("wan2.2-t2v-a14b", "NVIDIA H200")
    assert judge(row.seconds_per_step, row.end_to_end_seconds, row, table)[0] == "pass"
    assert judge(row.seconds_per_step * 1.29, row.end_to_end_seconds, row, table)[0] == "pass"
    assert judge(row.seconds_per_step * 1.31, row.end_to_end_seconds, row, table)[0] == "warn"
    assert judge(row.seconds_per_step, row.end_to_end_seconds * 3.01, row, table)[0] == "fail"


def test_spread_tolerance_per_model():
    table = load_table()
    assert table.spread_for("tiny-wan2.2") == 0.5  # overhead-bound: jitters with the host
    assert table.spread_for("wan2.2-t2v-a14b") == table.spread_tolerance == 0.15
    assert table.spread_for("unknown-model") == 0.15


def test_bad_table_json(tmp_path: Path):
    bad = tmp_path / "t.json"
    bad.write_text("{nope")
    with pytest.raises(SelfTestError, match=r"t\.json: not JSON"):
        load_table(bad)


def test_verdict_of():
    st = lambda status: StageResult("x", status, "")  # noqa: E731
    assert verdict_of([st("pass"), st("skip")]) == "pass"
    assert verdict_of([st("pass"), st("warn")]) == "degraded"
    assert verdict_of([st("warn"), st("fail"), st("skip")]) == "fail"


def test_default_report_path(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("GPUBAKE_REPORT", str(tmp_path / "x.json"))
    assert default_report_path() == tmp_path / "x.json"
    monkeypatch.delenv("GPUBAKE_REPORT")
    monkeypatch.setattr("gpubake.smoke_tests.report.WORKSPACE_REPORT", tmp_path / "ws" / "gpubake" / "selftest.json")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_report_path() == tmp_path / "home" / ".cache" / "gpubake" / "selftest.json"
    (tmp_path / "ws").mkdir()
    assert default_report_path() == tmp_path / "ws" / "gpubake" / "selftest.json"


def test_report_json_round_trip(tmp_path: Path):
    rep = Report(image="demo", model_id="tiny-wan2.2", options={})
    rep.stages.append(StageResult("gpu", "pass", "ok", {"gpus": []}, 0.1, 60))
    rep.write(tmp_path / "r.json")
    running = json.loads((tmp_path / "r.json").read_text())
    assert running["state"] == "running" and running["verdict"] is None and "RUNNING" in running["summary"]
    rep.finish()
    rep.write(tmp_path / "r.json")
    done = json.loads((tmp_path / "r.json").read_text())
    assert done["verdict"] == "pass" and done["schema_version"] == 1 and rep.exit_code == 0


def test_gpu_info_dict():
    g = GpuInfo(0, "NVIDIA B200", 192 * 2**30, "580.95.05", (10, 0))
    d = g.to_dict()
    assert d["arch"] == "sm_100" and d["compute_capability"] == "10.0" and d["memory_total_gib"] == 192.0


def test_quick_hashes_small_files_and_a_sample_of_large(tiny_nvfp4_checkpoint: Path, tmp_path: Path, monkeypatch):
    model = tmp_path / "m"
    shutil.copytree(tiny_nvfp4_checkpoint, model)
    manifest = json.loads((model / "gpubake-manifest.json").read_text())["files"]
    monkeypatch.setattr(modelcheck, "SMALL_FILE", 10_000)  # make the weights "large"
    large = sorted(rel for rel, e in manifest.items() if e["size"] > 10_000)
    assert len(large) >= 4
    full = modelcheck.check_model_dir(model)
    quick = modelcheck.check_model_dir(model, quick=True, rng=random.Random(0))
    assert not full.problems and not quick.problems
    assert len(full.hashed) == len(manifest)
    sampled = set(quick.hashed) & set(large)
    assert len(sampled) == max(1, round(len(large) * modelcheck.QUICK_SAMPLE))
    assert set(quick.hashed) - set(large) == set(manifest) - set(large)  # all small files
    # a corrupt large file outside the sample is missed by --quick, found by a full check
    victim = sorted(set(large) - sampled)[0]
    data = bytearray((model / victim).read_bytes())
    data[-1] ^= 1
    (model / victim).write_bytes(bytes(data))
    assert modelcheck.check_model_dir(model, quick=True, rng=random.Random(0)).problems == []
    assert modelcheck.check_model_dir(model).problems == [f"{victim}: sha256 mismatch"]


def test_extra_files_are_listed_and_fail(tiny_nvfp4_checkpoint: Path, tmp_path: Path):
    """Issue 13: the manifest is the whole truth; a file it does not list fails the check."""
    model = tmp_path / "m"
    shutil.copytree(tiny_nvfp4_checkpoint, model)
    (model / "notes.txt").write_text("hi")
    res = modelcheck.check_model_dir(model)
    assert res.problems == ["notes.txt: not in the manifest"] and res.extra_files == ["notes.txt"]
