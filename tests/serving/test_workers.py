"""One worker per device behind one queue (issue 15), on the CPU: two workers, each with
its own tiny pipeline in this process, render two jobs at the same time; the SQLite claim
never hands one job to two workers; each worker runs its own self-test and the report
lists them all with the pool's verdict; --workers is checked in one line."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from gpubake.cli import _run
from gpubake.provisioning.serving.build import WorkersError, worker_devices
from gpubake.provisioning.serving.jobs import DB_NAME, JobRecord, JobStore
from gpubake.provisioning.serving.service import GenerationService, Worker, pool_verdict
from gpubake.smoke_tests.report import Report, StageResult

REQ = {"prompt": "two at once", "size": "32x32", "frames": 1, "steps": 1}


def _hold_until_both_run(service: GenerationService, timeout: float = 60) -> dict[str, int]:
    """Make every worker's render wait at a 2-party barrier: a job finishes only if another
    renders at the same moment. Returns {job dir name: worker index} as they ran."""
    barrier = threading.Barrier(2, timeout=timeout)
    ran: dict[str, int] = {}
    for w in service.workers:
        real = w.generator.run

        def held(args, out_dir, _real=real, _w=w):
            ran[Path(out_dir).name] = _w.index
            barrier.wait()  # BrokenBarrierError (the job fails) unless both render at once
            return _real(args, out_dir)

        w.generator.run = held
    return ran


def test_two_workers_render_two_jobs_at_once(make_service, serve_service):
    service = make_service(selftest=False, device="cpu", workers=2)
    assert [w.device for w in service.workers] == ["cpu", "cpu"]
    with serve_service(service) as s:
        s.wait_phase("ready")
        a, b = service.workers
        assert a.generator is not None and b.generator is not None
        assert a.generator.pipeline is not b.generator.pipeline  # a pipeline each
        ran = _hold_until_both_run(service)
        ids = [s.post("/v1/generate", json={**REQ, "seed": i}).json()["id"] for i in range(2)]
        jobs = [s.wait_job(j) for j in ids]
        assert [j["status"] for j in jobs] == ["done", "done"], jobs
        assert sorted(j["result"]["worker"] for j in jobs) == [0, 1]
        assert sorted(ran.values()) == [0, 1] and set(ran) == set(ids)
        for j in ids:
            assert s.get(f"/v1/jobs/{j}/video").content[4:8] == b"ftyp"
        workers = s.get("/health").json()["workers"]
        assert [(w["index"], w["device"], w["status"], w["jobs_done"]) for w in workers] == \
            [(0, "cpu", "ready", 1), (1, "cpu", "ready", 1)]


def test_the_claim_never_gives_a_job_to_two_workers(tmp_path: Path):
    """Four claimers on two connections (as two processes would hold) race over 60 jobs."""
    path = tmp_path / DB_NAME
    stores = [JobStore(path), JobStore(path)]
    now = time.time()
    for i in range(60):
        stores[0].add(JobRecord(id=f"j{i:02d}", request={"i": i}, created_at=now + i))
    claimed: list[tuple[int, str]] = []
    lock, start = threading.Lock(), threading.Barrier(4)

    def claimer(k: int) -> None:
        store = stores[k % 2]
        start.wait()
        while (job := store.claim_next()) is not None:
            assert job.status == "running" and job.started_at is not None
            with lock:
                claimed.append((k, job.id))
            time.sleep(0.002)  # a render: the others claim meanwhile

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(j for _, j in claimed)
    assert len(counts) == 60 and set(counts.values()) == {1}  # each job exactly once
    assert stores[1].count("queued") == 0 and stores[1].count("running") == 60
    assert len({k for k, _ in claimed}) > 1  # the race really had several claimers
    # oldest first: each claimer saw its jobs in creation order
    for k in range(4):
        mine = [j for c, j in claimed if c == k]
        assert mine == sorted(mine)


def test_each_worker_self_tests_and_the_report_lists_them(make_service, serve_service):
    service = make_service(device="cpu", workers=2)
    with serve_service(service) as s:
        body = s.wait_phase("ready", "failed")
        assert body["status"] == "ready", body
        rep = Report.from_json(s.get("/health").json()["selftest"])
        assert rep.verdict == "pass" and rep.state == "done"
        assert [(w["index"], w["device"], w["verdict"]) for w in rep.workers] == [(0, "cpu", "pass"), (1, "cpu", "pass")]
        assert all(w["seconds_per_step"] > 0 for w in rep.workers)
        # worker 0's whole self-test is the report; worker 1 ran the stages of its own device
        assert [st.name for st in rep.stages] == ["gpu", "gpus", "kernels", "model", "render", "throughput"]
        second = service.workers[1].report
        assert [st.name for st in second.stages] == ["gpu", "kernels", "render", "throughput"]
        assert Path(second.stage("render").values["video"]).parent.name == "selftest-clip-1"
        assert "worker 1 cpu" in rep.summary()
        on_disk = Report.read(service.report_path)
        assert on_disk.workers == rep.workers and on_disk.verdict == "pass"


def _finished(verdict: str, model: str = "pass") -> Report:
    rep = Report(image="x", model_id="tiny-wan2.2", options={},
                 stages=[StageResult("model", model, ""), StageResult("render", "pass" if verdict == "pass" else
                                                                       "warn" if verdict == "degraded" else "fail", "")])
    rep.finish()
    return rep


@pytest.mark.parametrize(("verdicts", "model", "want"), [
    (["pass", "pass"], "pass", "pass"),
    (["pass", "fail"], "pass", "degraded"),   # a bad card costs its worker, not the machine
    (["fail", "pass"], "pass", "degraded"),
    (["degraded", "pass"], "pass", "degraded"),
    (["fail", "fail"], "pass", "fail"),
    (["pass", "pass"], "fail", "fail"),       # bad model files fail everything
    (["pass"], "pass", "pass"),
    (["fail"], "pass", "fail"),
])
def test_pool_verdict(verdicts, model, want):
    workers = [Worker(i, f"cuda:{i}", report=_finished(v)) for i, v in enumerate(verdicts)]
    assert pool_verdict(workers, model_failed=model == "fail") == want


def test_worker_devices():
    assert worker_devices("auto", "cpu", True) == ["cpu"]
    assert worker_devices(3, "cpu", False) == ["cpu"] * 3
    assert worker_devices("auto", "cuda:2", True) == ["cuda:2"]
    assert worker_devices(1, None, True) == [None]  # one worker: the self-test picks the device
    assert worker_devices("auto", None, False) == [None]  # a CPU image never asks torch
    with pytest.raises(WorkersError, match="--workers 2 with --device cuda:1: one device, one worker"):
        worker_devices(2, "cuda:1", True)
    with pytest.raises(WorkersError, match=r"--workers 2: torch sees 0 GPU\(s\) here; pass --device cpu"):
        worker_devices(2, None, True)  # this machine has no GPU
    with pytest.raises(WorkersError, match="--workers: auto or a number >= 1, got 0"):
        worker_devices(0, None, True)


def test_worker_devices_one_per_visible_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert worker_devices("auto", None, True) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert worker_devices("auto", "cuda", True) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert worker_devices(2, None, True) == ["cuda:0", "cuda:1"]
    with pytest.raises(WorkersError, match="--workers 5: torch sees 4 GPU"):
        worker_devices(5, None, True)


def test_serve_workers_flag(tmp_path: Path, capsys):
    base = ["serve", "--image", "demo", "--model-dir", str(tmp_path), "--host", "127.0.0.1", "--dry-run"]
    assert _run([*base, "--device", "cpu", "--workers", "2"]) == 0
    assert "2 worker(s): cpu, cpu" in " ".join(capsys.readouterr().err.split())
    assert _run([*base, "--workers", "two"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --workers: auto or a number >= 1, got 'two'"
    assert _run([*base, "--workers", "3"]) == 2  # no GPU here, no --device cpu
    assert "error: --workers 3: a CPU-only image uses no GPU; pass --device cpu for CPU workers" in \
        capsys.readouterr().err
