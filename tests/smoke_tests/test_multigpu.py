"""The "gpus" stage (every GPU, an all-reduce across them), a worker's one-GPU view of the
host, and the report's GPU and worker lists read back old and new."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpubake.smoke_tests import multigpu
from gpubake.smoke_tests.expectations import load_table
from gpubake.smoke_tests.probe import DeviceProbe, cuda_index_of, normal_uuid
from gpubake.smoke_tests.report import Report, StageResult
from gpubake.smoke_tests.multigpu import gpus_stage
from gpubake.smoke_tests.stages import Context


def context(facts: Any, probe: Any, tmp_path: Path, *, device: str = "cpu", mode: str = "gpu") -> Context:
    ctx = Context(facts=facts, model_dir=tmp_path, out_dir=tmp_path, probe=probe, table=load_table(None))
    ctx.mode, ctx.device = mode, device
    return ctx


def test_two_gpus_on_the_cpu_path_all_reduce_over_gloo(fake_host, gpu_spec, tmp_path: Path):
    res = gpus_stage(context(gpu_spec, fake_host(2), tmp_path))
    assert res.status == "pass", res.message
    ar = res.values["allreduce"]
    assert ar["ok"] and ar["exact"] and ar["world"] == 2 and ar["backend"] == "gloo" and ar["bus_gbps"] > 0
    assert [g["index"] for g in res.values["gpus"]] == [0, 1] and res.values["count"] == 2
    assert all(g["status"] == "pass" and g["arch"] == "sm_90" for g in res.values["gpus"])
    assert "gloo all-reduce across 2 exact" in res.message and "device forced to cpu" in res.message


def test_one_gpu_skips_the_all_reduce_with_the_reason(fake_host, gpu_spec, tmp_path: Path):
    res = gpus_stage(context(gpu_spec, fake_host(1), tmp_path))
    assert res.status == "skip" and "all-reduce skipped: fewer than 2 GPUs" in res.message
    assert len(res.values["gpus"]) == 1 and res.values["allreduce"] is None


def test_cpu_mode_has_no_gpu_to_list(no_gpu, demo_spec, tmp_path: Path):
    res = gpus_stage(context(demo_spec, no_gpu, tmp_path, mode="cpu"))
    assert res.status == "skip" and res.values["gpus"] == []


def test_a_failed_all_reduce_is_a_warning_naming_the_error(fake_host, gpu_spec, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(multigpu, "allreduce_check", lambda world, **kw: {
        "ok": False, "world": world, "backend": kw["backend"], "error": "rank 1: DistBackendError: NCCL timeout"})
    res = gpus_stage(context(gpu_spec, fake_host(2), tmp_path))
    assert res.status == "warn"
    assert "gloo all-reduce across 2 FAILED: rank 1: DistBackendError: NCCL timeout" in res.message


def test_each_gpu_is_judged_and_a_bad_one_is_named(fake_host, gpu_spec, tmp_path: Path):
    res = gpus_stage(context(gpu_spec, fake_host(3, {2: {"ecc_uncorrected_volatile": 4}}), tmp_path))
    assert res.status == "warn"  # the card costs its worker; the gpu stage fails the worker that renders on it
    bad = res.values["gpus"][2]
    assert bad["status"] == "fail" and bad["notes"] == ["4 uncorrected ECC errors since boot"]
    assert "GPU 2: 4 uncorrected ECC errors since boot" in res.message
    assert res.values["allreduce"]["world"] == 3


def test_on_gpus_only_those_torch_sees_join_the_nccl_all_reduce(fake_host, gpu_spec, tmp_path: Path, monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,0 on a 3-GPU host: torch's cuda:0 is NVML's GPU 2."""
    asked: dict[str, Any] = {}
    monkeypatch.setattr(multigpu, "cuda_uuids", lambda: ["00000002-aaaa", "00000000-aaaa"])
    monkeypatch.setattr(multigpu, "_matmul_check", lambda i: None)
    monkeypatch.setattr(multigpu, "allreduce_check", lambda world, **kw: asked.update(world=world, **kw) or {
        "ok": True, "exact": True, "world": world, "backend": kw["backend"], "bus_gbps": 350.0, "bytes": 2**28})
    res = gpus_stage(context(gpu_spec, fake_host(3), tmp_path, device="cuda"))
    assert asked == {"world": 2, "backend": "nccl", "device_type": "cuda"}
    assert [(g["index"], g["visible"], g["cuda_index"]) for g in res.values["gpus"]] == \
        [(0, True, 1), (1, False, None), (2, True, 0)]
    assert res.status == "pass" and "3 GPU(s), 2 visible to torch; nccl all-reduce across 2 exact, 350.0 GB/s" \
        in res.message
    assert "GPU 1: not visible to torch" in res.message


def test_a_wrong_matmul_fails_that_gpu(fake_host, gpu_spec, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(multigpu, "cuda_uuids", lambda: ["00000000-aaaa"])
    monkeypatch.setattr(multigpu, "_matmul_check", lambda i: "matmul off by 5.00e-01 (relative) against the CPU")
    res = gpus_stage(context(gpu_spec, fake_host(1), tmp_path, device="cuda"))
    assert res.status == "warn" and res.values["gpus"][0]["status"] == "fail"
    assert "GPU 0: matmul off by 5.00e-01" in res.message


def test_allreduce_check_times_out_a_group_a_rank_never_joins():
    """A 2-rank group whose second rank is never started cannot form: rank 0 waits in it,
    the check ends rank 0 at the deadline and says that no rank gave a result."""
    res = multigpu.allreduce_check(2, backend="gloo", device_type="cpu", timeout=3, start_ranks=[0])
    assert not res["ok"] and res["error"] == "rank(s) 0, 1 gave no result within 3 s"
    assert res["wall_seconds"] < 15


# ------------------------------------------------------------- a worker's view, the mapping


def test_device_probe_sees_the_one_gpu_torch_calls_cuda_i(fake_host):
    host = fake_host(4)
    view = DeviceProbe(host, 1, uuids=["00000003-aaaa", "00000001-aaaa"])  # CUDA_VISIBLE_DEVICES=3,1
    assert [g.index for g in view.probe().gpus] == [1]
    assert [g.index for g in DeviceProbe(host, 0, uuids=["00000003-aaaa", "00000001-aaaa"]).probe().gpus] == [3]
    none = DeviceProbe(host, 2, uuids=["00000003-aaaa", "00000001-aaaa"]).probe()
    assert none.gpus == [] and none.error == "no GPU of this host is cuda:2"
    no_uuid = fake_host(2, uuids=False)
    assert [g.index for g in DeviceProbe(no_uuid, 1, uuids=[None, None]).probe().gpus] == [1]  # by position


def test_uuid_spellings_match(fake_host):
    assert normal_uuid("GPU-58D2aaaa") == normal_uuid("58d2aaaa") == "58d2aaaa"
    assert cuda_index_of(fake_host(2).gpus, ["00000001-aaaa"]) == {0: None, 1: 0}


# ------------------------------------------------------------- the report, old and new


def test_a_report_without_the_gpu_and_worker_lists_still_reads():
    rep = Report(image="demo", model_id="tiny-wan2.2", options={})
    rep.stages.append(StageResult("gpu", "pass", "ok"))
    rep.finish()
    old = rep.to_dict()
    del old["gpus"], old["workers"]  # as a gpubake before issue 15 wrote it
    back = Report.from_json(old)
    assert back.gpus == [] and back.workers == [] and back.verdict == "pass"


def test_the_gpu_and_worker_lists_round_trip(tmp_path: Path):
    rep = Report(image="demo", model_id="tiny-wan2.2", options={},
                 gpus=[{"index": 0, "name": "H200", "status": "pass"}],
                 workers=[{"index": 0, "device": "cuda:0", "verdict": "pass", "seconds_per_step": 1.5},
                          {"index": 1, "device": "cuda:1", "verdict": "fail", "reason": "self-test failed: kernels"}])
    rep.finish()
    rep.write(tmp_path / "r.json")
    back = Report.read(tmp_path / "r.json")
    assert back == rep
    assert "FAIL worker 1 cuda:1 self-test failed: kernels" in back.summary()
    assert "PASS worker 0 cuda:0 1.500 s/step" in back.summary()
    with pytest.raises(Exception, match="workers"):
        Report.from_json({**rep.to_dict(), "workers": "two"})


def test_the_selftest_fills_the_gpu_list(fake_host, run_selftest, gpu_spec, write_table):
    report = run_selftest(gpu_spec, fake_host(2), table_path=write_table(1000.0, 1000.0))
    assert report.verdict == "pass", report.summary()
    assert [g["index"] for g in report.gpus] == [0, 1] and report.stage("gpus").status == "pass"
