"""The report's one reader (`Report.from_json` / `Report.read`) against its writer: what
`launch`, `remote selftest` and the service read back is what the self-test wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpubake.smoke_tests.report import IN_PROGRESS, Report, ReportError, StageResult


def written(verdict_stages: list[str] | None = None) -> Report:
    rep = Report(image="demo", model_id="tiny-wan2.2", options={"quick": True})
    for i, status in enumerate(verdict_stages or []):
        rep.stages.append(StageResult(f"s{i}", status, f"stage {i}", {"n": i}, 0.5, 60))
    return rep


def test_a_written_report_reads_back_equal(tmp_path: Path):
    rep = written(["pass", "warn"])
    rep.stages.append(StageResult("throughput", "pass", "1.0x", {"seconds_per_step": 0.25}, 2.0, 120))
    rep.finish()
    rep.write(tmp_path / "r.json")
    back = Report.read(tmp_path / "r.json")
    assert back == rep
    assert back.outcome == "degraded" and back.exit_code == 1
    assert back.throughput() == {"status": "pass", "message": "1.0x", "seconds_per_step": 0.25}


def test_a_running_report_is_in_progress():
    data = written(["pass"]).to_dict()
    rep = Report.from_json(data)
    assert rep.state == "running" and rep.final_verdict is None and rep.outcome == IN_PROGRESS
    assert rep.throughput() is None


def test_keys_a_newer_writer_adds_are_ignored():
    rep = written(["pass"])
    rep.finish()
    data = {**rep.to_dict(), "new_field": 1}
    data["stages"][0]["new_stage_field"] = "x"
    assert Report.from_json(data) == rep


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.pop("hostname"), "r.json: hostname: missing required field"),
        (lambda d: d.update(schema_version=2), "r.json: schema_version: 2 (this gpubake reads 1)"),
        (lambda d: d.update(verdict="great"), "r.json: verdict: Input should be 'pass', 'degraded' or 'fail'"),
        (lambda d: d["stages"][0].update(status="ok"), "r.json: stages.0.status: Input should be"),
        (lambda d: d.update(verdict=None), "r.json: verdict: missing on a finished report"),
        (lambda d: d.update(stages="all good"), "r.json: stages: Input should be a valid list"),
    ],
)
def test_a_report_of_another_shape_is_one_line(tmp_path: Path, change, needle):
    rep = written(["pass"])
    rep.finish()
    data = rep.to_dict()
    change(data)
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(ReportError) as exc:
        Report.read(tmp_path / "r.json")
    assert str(exc.value).startswith(str(tmp_path)) and needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_and_non_json_files(tmp_path: Path):
    with pytest.raises(ReportError, match=r"nope\.json: no self-test report$"):
        Report.read(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"bad\.json: the self-test report is not JSON"):
        Report.read(tmp_path / "bad.json")
    with pytest.raises(ReportError, match=r"^report: a self-test report is a JSON object, got list$"):
        Report.from_json([])
