"""The throughput table's rule (issue 18): every row is measured or estimated, and an
estimated row never fails a machine on a slow clip: degraded at most, so the service
(which refuses generation only on a `fail` verdict) keeps generating."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from gpubake.smoke_tests.expectations import SelfTestError, judge, load_table


def _packaged() -> dict:
    return json.loads(resources.files("gpubake.smoke_tests").joinpath("data/throughput.json").read_text())


def test_every_packaged_row_is_measured_or_estimated():
    raw = _packaged()
    rows = [(m, r) for m, entry in raw["models"].items() for r in entry["gpus"]]
    assert rows and all(r["source"] in ("measured", "estimate") for _, r in rows)
    assert {r["source"] for _, r in rows} == {"measured", "estimate"}  # both kinds are in use


@pytest.mark.parametrize("source", [None, "guess", ""])
def test_a_row_without_a_valid_source_is_refused(tmp_path: Path, source):
    raw = _packaged()
    row = raw["models"]["wan2.2-t2v-a14b"]["gpus"][2]
    if source is None:
        del row["source"]
    else:
        row["source"] = source
    path = tmp_path / "t.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SelfTestError, match=r"t\.json: field models\.wan2\.2-t2v-a14b\.gpus\.2\.source") as err:
        load_table(path)
    assert "\n" not in str(err.value)


def test_judge_fails_only_on_a_measured_row():
    table = load_table()
    measured = table.lookup("wan2.2-t2v-a14b", "NVIDIA H200")
    estimated = table.lookup("wan2.2-t2v-a14b", "NVIDIA A100-SXM4-80GB")
    assert measured.source == "measured" and estimated.source == "estimate"
    far = table.fail_factor * 1.01
    assert judge(measured.seconds_per_step * far, measured.end_to_end_seconds, measured, table)[0] == "fail"
    status, ratio = judge(estimated.seconds_per_step * far, estimated.end_to_end_seconds, estimated, table)
    assert status == "warn" and ratio == pytest.approx(far)
    # end-to-end alone, 100x: still degraded, never failed
    assert judge(estimated.seconds_per_step, estimated.end_to_end_seconds * 100, estimated, table)[0] == "warn"
    # within the tolerance an estimate passes like a measurement
    assert judge(estimated.seconds_per_step, estimated.end_to_end_seconds, estimated, table)[0] == "pass"


def test_selftest_against_an_estimated_row_is_degraded_not_failed(run_selftest, gpu_spec, fake_gpu, tmp_path):
    # The tiny model's H100 row, made an estimate of a microsecond a step: the CPU render is
    # millions of times slower, far past fail_factor.
    raw = _packaged()
    row = raw["models"]["tiny-wan2.2"]["gpus"][0]
    row.update(seconds_per_step=1e-6, end_to_end_seconds=1e-6, source="estimate", basis="test: an estimate")
    table = tmp_path / "estimated.json"
    table.write_text(json.dumps(raw))
    report = run_selftest(gpu_spec, fake_gpu(), table_path=table)
    tp = report.stage("throughput")
    assert tp.values["ratio"] > raw["fail_factor"] and tp.values["expected"]["source"] == "estimate"
    assert tp.status == "warn" and report.verdict == "degraded" and report.exit_code == 1
    assert "the estimate H100 SXM reference" in tp.message
    assert "reference is an estimate: degraded, not failed" in tp.message
