"""Jobs in SQLite under the data dir: they outlive the process, a job cut off by a dead
process is failed with the reason, outputs are pruned by age and size, and a full disk
fails the job, not the service. (tests/serving/test_soak.py kills a real process.)"""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path

import pytest

from gpubake.provisioning.serving.jobs import DB_NAME, JobRecord, JobStore


def _request(prompt: str, **kw) -> dict:
    base = {"prompt": prompt, "negative_prompt": "", "width": 32, "height": 32, "frames": 1, "steps": 1, "seed": 1,
            "guidance_scale": 4.0, "guidance_scale_2": 3.0}
    return {**base, **kw}


def test_the_table_is_sqlite_wal(tmp_path: Path):
    store = JobStore(tmp_path / DB_NAME)
    store.add(JobRecord(id="a", request=_request("a")))
    store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT id, status FROM jobs").fetchall() == [("a", "queued")]


def test_a_dead_process_leaves_jobs_the_next_one_finishes(make_service, serve_service, tmp_path: Path):
    data = tmp_path / "data"
    # what a process killed mid-job leaves behind: one row running, two queued
    dead = JobStore(data / DB_NAME)
    now = time.time()
    dead.add(JobRecord(id="cut-off", request=_request("cut off"), status="running", created_at=now - 3,
                       started_at=now - 2))
    dead.add(JobRecord(id="waiting-1", request=_request("one"), created_at=now - 2))
    dead.add(JobRecord(id="waiting-2", request=_request("two", seed=2), created_at=now - 1))
    dead.close()
    with serve_service(make_service(selftest=False, device="cpu", data_dir=data)) as s:
        s.wait_phase("ready")
        cut = s.get("/v1/jobs/cut-off").json()
        assert cut["status"] == "failed"
        assert cut["error"].startswith("the service stopped while this job was running (process restarted at ")
        assert s.get("/v1/jobs/cut-off/video").status_code == 409
        for jid in ("waiting-1", "waiting-2"):
            done = s.wait_job(jid)
            assert done["status"] == "done", done
            assert s.get(f"/v1/jobs/{jid}/video").content[4:8] == b"ftyp"
        assert s.service.interrupted == 1


def test_outputs_pruned_by_age(make_service, serve_service, tmp_path: Path):
    service = make_service(selftest=False, device="cpu", keep_seconds=1.0)
    with serve_service(service) as s:
        s.wait_phase("ready")
        old = s.post("/v1/generate", json={"prompt": "old", "size": "32x32", "frames": 1, "steps": 1}).json()["id"]
        assert s.wait_job(old)["status"] == "done"
        assert (service.jobs_dir / old / "video.mp4").is_file()
        time.sleep(1.2)
        new = s.post("/v1/generate", json={"prompt": "new", "size": "32x32", "frames": 1, "steps": 1}).json()["id"]
        assert s.wait_job(new)["status"] == "done"
        deadline = time.monotonic() + 10
        while s.get(f"/v1/jobs/{old}").status_code != 404:  # pruned right after the next job
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (service.jobs_dir / old).exists()
        assert s.get(f"/v1/jobs/{new}/video").status_code == 200


def test_outputs_pruned_by_size_oldest_first(make_service, serve_service):
    service = make_service(selftest=False, device="cpu")
    with serve_service(service) as s:
        s.wait_phase("ready")
        ids = []
        for i in range(3):
            jid = s.post("/v1/generate", json={"prompt": f"clip {i}", "size": "32x32", "frames": 1, "steps": 1,
                                               "seed": i}).json()["id"]
            assert s.wait_job(jid)["status"] == "done"
            ids.append(jid)
            if i == 0:
                one = service.store.get(jid).bytes
                assert one > 0
                service.keep_bytes = int(one * 2.5)  # room for two clips
        time.sleep(0.3)  # the prune after the third job
        assert s.get(f"/v1/jobs/{ids[0]}").status_code == 404 and not (service.jobs_dir / ids[0]).exists()
        assert [s.get(f"/v1/jobs/{j}/video").status_code for j in ids[1:]] == [200, 200]


def test_full_disk_fails_the_job_and_the_service_stays_up(make_service, serve_service, monkeypatch):
    service = make_service(selftest=False, device="cpu")
    req = {"prompt": "no room", "size": "32x32", "frames": 1, "steps": 1}
    with serve_service(service) as s:
        s.wait_phase("ready")
        # 1. the data dir's free space is checked before rendering
        service.min_free_bytes = 2**62
        jid = s.post("/v1/generate", json=req).json()["id"]
        job = s.wait_job(jid)
        assert job["status"] == "failed"
        assert job["error"].startswith(f"disk full: no space left under the data directory {service.data_dir} (")
        assert "free space or lower --keep-gb" in job["error"]
        service.min_free_bytes = 0
        # 2. ENOSPC while the clip is written (what a disk filling mid-job raises)
        import gpubake.provisioning.render as render_mod

        def no_space(frames, dest, *, fps=16, preset="medium"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            (dest.parent / ".video.partial.mp4").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))

        monkeypatch.setattr(render_mod, "write_mp4", no_space)
        jid = s.post("/v1/generate", json=req).json()["id"]
        job = s.wait_job(jid)
        assert job["status"] == "failed" and job["error"].startswith("disk full: ")
        assert "No space left on device" in job["error"]
        assert not (service.jobs_dir / jid).exists()  # nothing half-written left
        monkeypatch.undo()
        assert s.get("/health").json()["status"] == "ready"
        ok = s.post("/v1/generate", json=req).json()["id"]
        assert s.wait_job(ok)["status"] == "done"


@pytest.mark.parametrize("max_queue", [2])
def test_queue_limit_counts_waiting_rows(make_service, serve_service, hold_generator, max_queue):
    service = make_service(selftest=False, device="cpu", max_queue=max_queue)
    with serve_service(service) as s:
        s.wait_phase("ready")
        gate, started = hold_generator(service)
        req = {"prompt": "q", "size": "32x32", "frames": 1, "steps": 1}
        first = s.post("/v1/generate", json=req).json()["id"]
        assert started.wait(30)
        waiting = [s.post("/v1/generate", json=req) for _ in range(max_queue)]
        assert [r.status_code for r in waiting] == [202] * max_queue
        full = s.post("/v1/generate", json=req)
        assert full.status_code == 429 and full.headers["Retry-After"] == "30"
        assert full.json() == {"error": f"queue full ({max_queue} jobs waiting); retry later", "phase": "ready"}
        health = s.get("/health").json()["queue"]
        assert health == {"waiting": max_queue, "running": 1, "capacity": max_queue}
        gate.set()
        for jid in [first, *(r.json()["id"] for r in waiting)]:
            assert s.wait_job(jid)["status"] == "done"
