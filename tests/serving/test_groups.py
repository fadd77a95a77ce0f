"""One clip across a group of processes (issue 15, `gpubake serve --gpus-per-clip N`), on
the CPU: a group of 2 CPU ranks over gloo (``--device cpu``: the CPU has no GPUs, as the
pool tests fake several with CPU workers) behind the real HTTP front with an API key.
Ulysses on the CPU is bit-exact (provisioning.parallel; tests/perf/test_parallel.py), so
the group's clip must equal the one-process render of the same request byte for byte.
A rank that dies fails the job it was rendering with one line and takes its group out of
service on /health; no rank process outlives the service; bad values are one line, exit 2."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import group_faults  # noqa: E402
from conftest import API_KEY  # noqa: E402

from gpubake.cli import _run  # noqa: E402
from gpubake.provisioning.serving.groups import GroupsError, group_devices  # noqa: E402
from gpubake.smoke_tests.report import Report  # noqa: E402

REQ = {"prompt": "a lighthouse in a storm", "size": "32x32", "frames": 9, "steps": 2, "seed": 7}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _frames(video: Path):
    import imageio.v3 as iio

    return iio.imread(video, extension=".mp4")


def test_one_clip_across_two_ranks_equals_the_one_process_render(make_service, serve_service, tiny_nvfp4_checkpoint,
                                                                 tmp_path):
    service = make_service(device="cpu", gpus_per_clip=2)
    with serve_service(service, api_key=API_KEY) as s:
        body = s.wait_phase("ready", "failed", timeout=600)
        assert body["status"] == "ready", body
        health = s.get("/health").json()
        assert health["gpus_per_clip"] == 2
        (group,) = health["workers"]
        assert group["devices"] == ["cpu", "cpu"] and group["status"] == "ready" and group["verdict"] == "pass"
        assert group["parallel"]["parallel"] == "ulysses:2" and group["parallel"]["rank"] == 0
        assert group["parallel"]["self_attention_backend"] == "native"
        assert group["plan"]["parallel"] == "ulysses:2"
        pids = group["pids"]
        assert len(pids) == 2 and os.getpid() not in pids
        # the self-test: both ranks rendered its clip together, the report says so
        rep = Report.from_json(health["selftest"])
        assert rep.verdict == "pass" and rep.state == "done"
        render = rep.stage("render")
        assert render.values["group"] == {"devices": ["cpu", "cpu"], "ranks": 2}
        assert render.values["runtime"]["plan"]["parallel"] == "ulysses:2"
        assert render.values["runtime"]["applied"]["parallel"]["experts"] == ["transformer", "transformer_2"]
        assert [w["devices"] for w in rep.workers] == [["cpu", "cpu"]]
        assert Report.read(service.report_path).workers[0]["parallel"]["parallel"] == "ulysses:2"
        # the HTTP front is the same: the key is required
        assert s.post("/v1/generate", json=REQ, headers={}).status_code == 401
        job_id = s.post("/v1/generate", json=REQ).json()["id"]
        job = s.wait_job(job_id, timeout=300)
        assert job["status"] == "done", job
        assert job["result"]["devices"] == ["cpu", "cpu"] and job["result"]["parallel"]["parallel"] == "ulysses:2"
        assert job["result"]["worker"] == 0 and job["result"]["frames"] == 9
        video = s.get(f"/v1/jobs/{job_id}/video")
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        assert s.get("/health").json()["workers"][0]["jobs_done"] == 1
        request = job["request"]
    # the service stopped: no rank process is left
    assert all(_gone(p) for p in pids)

    # the same request in this one process, no split
    from gpubake.provisioning.models import get_model
    from gpubake.provisioning.pipeline import load_serving_pipeline
    from gpubake.provisioning.serving.generate import Generator
    from gpubake.provisioning.serving.limits import limits_for
    from gpubake.provisioning.serving.schemas import ResolvedRequest

    one = load_serving_pipeline(tiny_nvfp4_checkpoint, "cpu")
    assert one.plan.parallel == "none"
    model = get_model("tiny-wan2.2")
    one.pipe.set_progress_bar_config(disable=True)
    Generator(one.pipe, model, limits_for(one.pipe, "cpu", model)).run(ResolvedRequest.from_dict(request),
                                                                       tmp_path / "one")
    grouped = service.jobs_dir / job_id
    assert (grouped / "frame0.png").read_bytes() == (tmp_path / "one" / "frame0.png").read_bytes()
    a, b = _frames(grouped / "video.mp4"), _frames(tmp_path / "one" / "video.mp4")
    assert a.shape == b.shape == (9, 32, 32, 3) and (a == b).all()


def test_a_rank_that_dies_fails_the_job_in_one_line_and_health_says_so(make_service, serve_service):
    service = make_service(device="cpu", gpus_per_clip=2, selftest=False, pipeline_loader=group_faults.dying_loader)
    with serve_service(service, api_key=API_KEY) as s:
        assert s.wait_phase("ready", "failed", timeout=600)["status"] == "ready"
        pids = s.get("/health").json()["workers"][0]["pids"]
        job_id = s.post("/v1/generate", json={**REQ, "prompt": group_faults.DIE}).json()["id"]
        job = s.wait_job(job_id, timeout=300)
        assert job["status"] == "failed"
        err = job["error"]
        assert "\n" not in err
        assert err == (f"group 0 (cpu,cpu): rank 1 (cpu, pid {pids[1]}) died (killed by SIGKILL) while rendering "
                       "this job; the group is out of service, submit the job again")
        assert s.get(f"/v1/jobs/{job_id}/video").status_code == 409
        assert not (service.jobs_dir / job_id).exists()  # no half-written clip
        health = s.wait_phase("failed", timeout=30)
        assert health["ready"] is False
        full = s.get("/health").json()
        (group,) = full["workers"]
        assert group["status"] == "failed" and group["job"] is None
        assert group["reason"] == f"rank 1 (cpu, pid {pids[1]}) died (killed by SIGKILL); out of service"
        assert full["reason"].startswith("every group is out of service: group 0 (cpu,cpu): rank 1")
        assert all(_gone(p) for p in pids)  # rank 0 was ended with it
        refused = s.post("/v1/generate", json=REQ)
        assert refused.status_code == 503 and "every group is out of service" in refused.json()["error"]


def test_a_group_whose_self_test_fails_serves_nothing_and_leaves_no_process(make_service, serve_service,
                                                                            tiny_nvfp4_checkpoint, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_nvfp4_checkpoint, model)
    weights = sorted((model / "transformer").glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the model stage's hash fails, the render is skipped
    weights.write_bytes(bytes(data))
    service = make_service(device="cpu", gpus_per_clip=2, model_dir=model)
    with serve_service(service, api_key=API_KEY) as s:
        assert s.wait_phase("ready", "failed", timeout=600)["status"] == "failed"
        full = s.get("/health").json()
        (group,) = full["workers"]
        assert group["status"] == "failed" and group["reason"].startswith("self-test failed: model: ")
        assert "sha256 mismatch" in group["reason"] and full["reason"] == group["reason"]  # not a peer's exit
        rep = Report.from_json(full["selftest"])
        assert rep.verdict == "fail" and rep.stage("render").status == "skip"
        assert all(_gone(p) for p in group["pids"])  # rank 0 told its peer to stop, both ended
        assert s.post("/v1/generate", json=REQ).status_code == 503


def _dry(args: list[str], model_dir: Path) -> list[str]:
    return ["serve", "--image", "demo", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--dry-run", *args]


def test_gpus_per_clip_flag_and_env(tiny_nvfp4_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    ck = tiny_nvfp4_checkpoint  # 2 attention heads
    assert _run(_dry(["--device", "cpu", "--gpus-per-clip", "2"], ck)) == 0
    assert "1 group(s) of 2, one clip split ulysses:2: cpu,cpu" in " ".join(capsys.readouterr().err.split())
    assert _run(_dry(["--device", "cpu", "--gpus-per-clip", "3", "--workers", "2"], ck)) == 0  # 2 heads: ring
    assert "2 group(s) of 3, one clip split ring:3: cpu,cpu,cpu; cpu,cpu,cpu" in \
        " ".join(capsys.readouterr().err.split())
    monkeypatch.setenv("GPUBAKE_GPUS_PER_CLIP", "2")
    assert _run(_dry(["--device", "cpu"], ck)) == 0
    assert "1 group(s) of 2" in " ".join(capsys.readouterr().err.split())
    assert _run(_dry(["--device", "cpu", "--gpus-per-clip", "1"], ck)) == 0  # the flag wins: the pool
    assert "1 worker(s): cpu" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--gpus-per-clip", "two"], {}, "error: --gpus-per-clip: a whole number >= 1, got 'two'"),
    (["--gpus-per-clip", "0"], {}, "error: --gpus-per-clip: a whole number >= 1, got '0'"),
    ([], {"GPUBAKE_GPUS_PER_CLIP": "-2"}, "error: GPUBAKE_GPUS_PER_CLIP: a whole number >= 1, got '-2'"),
    (["--gpus-per-clip", "2"], {},
     "error: --gpus-per-clip 2: a CPU-only image uses no GPU; pass --device cpu for a group of CPU processes"),
    (["--gpus-per-clip", "2", "--device", "cuda:1"], {},
     "error: --gpus-per-clip 2 with --device cuda:1: a group needs 2 GPUs (leave --device out, or --device cpu "
     "for CPU processes)"),
    (["--gpus-per-clip", "3", "--device", "cpu"], {"GPUBAKE_RUNTIME": "parallel=ulysses:3"},
     "error: --gpus-per-clip 3: parallel=ulysses:3 needs the model's attention heads to divide by 3, it has 2; "
     "set parallel=ring:3 or another --gpus-per-clip"),
    (["--gpus-per-clip", "2", "--device", "cpu"], {"GPUBAKE_RUNTIME": "parallel=ring:4"},
     "error: GPUBAKE_RUNTIME='parallel=ring:4': parallel=ring:4, but --gpus-per-clip 2 splits each clip across 2 "
     "processes; leave parallel out or set parallel=ulysses:2 or ring:2"),
    (["--gpus-per-clip", "2", "--device", "cpu"], {"GPUBAKE_RUNTIME": "plain"},
     "error: GPUBAKE_RUNTIME='plain': parallel=none, but --gpus-per-clip 2 splits each clip across 2 processes; "
     "leave parallel out or set parallel=ulysses:2 or ring:2"),
])
def test_bad_gpus_per_clip_is_one_line(args, env, line, tiny_nvfp4_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _run(_dry(args, tiny_nvfp4_checkpoint)) == 2
    err = capsys.readouterr().err
    assert " ".join(err.split()) == line and "Traceback" not in err


def test_groups_of_the_visible_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert group_devices(2, "auto", None, True) == [[f"cuda:{g * 2}", f"cuda:{g * 2 + 1}"] for g in range(4)]
    assert group_devices(8, "auto", "cuda", True) == [[f"cuda:{i}" for i in range(8)]]
    assert group_devices(4, 1, None, True) == [["cuda:0", "cuda:1", "cuda:2", "cuda:3"]]
    with pytest.raises(GroupsError, match=r"^--gpus-per-clip 3: does not divide the 8 GPUs torch sees"):
        group_devices(3, "auto", None, True)
    with pytest.raises(GroupsError, match=r"^--workers 3 --gpus-per-clip 4: needs 12 GPUs, torch sees 8$"):
        group_devices(4, 3, None, True)
    with pytest.raises(GroupsError, match=r"^--gpus-per-clip 16: torch sees 8 GPU\(s\) here"):
        group_devices(16, "auto", None, True)


class _Host:
    """Four H100s as NVML lists them (the GPU stage's probe seam)."""

    def __init__(self) -> None:
        from gpubake.smoke_tests.probe import GpuInfo

        self.gpus = [GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 * 2**30,
                             driver_version="580.95.05", compute_capability=(9, 0), uuid=f"GPU-{i:08x}-aaaa")
                     for i in range(4)]

    def probe(self):
        from gpubake.smoke_tests.probe import ProbeResult

        return ProbeResult(list(self.gpus), None)

    def throttle_reasons(self, index: int) -> list[str]:
        return []


def test_a_groups_gpu_stage_sees_its_own_gpus_by_uuid():
    from gpubake.smoke_tests.probe import DeviceProbe

    torch_order = [f"{i:08x}-aaaa" for i in (3, 2, 1, 0)]  # as torch spells them; CUDA's order is not NVML's
    got = DeviceProbe(_Host(), [0, 1], uuids=torch_order).probe()
    assert [g.index for g in got.gpus] == [2, 3] and got.error is None
    half = DeviceProbe(_Host(), [2, 5], uuids=torch_order).probe()
    assert [g.index for g in half.gpus] == [1] and half.error == "no GPU of this host is cuda:5"


def _dead_or_zombie(pid: int) -> bool:
    """Gone, or exited and waiting for a reaper (a zombie has no code left to run)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def test_no_rank_outlives_a_killed_service(tiny_nvfp4_checkpoint, tmp_path):
    """`gpubake serve --gpus-per-clip 2` in its own process, SIGKILLed once its group is up:
    the ranks die with it (PR_SET_PDEATHSIG), none is left holding the GPUs."""
    import signal
    import subprocess
    import time

    import requests
    from testutil import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubake", "serve", "--image", "demo", "--model-dir", str(tiny_nvfp4_checkpoint),
         "--report", str(tmp_path / "selftest.json"), "--data-dir", str(tmp_path / "data"), "--no-selftest",
         "--device", "cpu", "--gpus-per-clip", "2", "--host", "127.0.0.1", "--port", str(port),
         "--max-pixel-frames", "10000000"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GPUBAKE_API_KEY": API_KEY}, cwd=tmp_path)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not pids:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5,
                                      headers={"Authorization": f"Bearer {API_KEY}"}).json()
                if health.get("status") == "ready":
                    pids = health["workers"][0]["pids"]
            except requests.RequestException:
                pass
            time.sleep(0.2)
        assert len(pids) == 2 and proc.pid not in pids, (tmp_path / "serve.log").read_text()[-3000:]
        assert not any(_dead_or_zombie(p) for p in pids)
        # Killed in the middle of a long render (~5 s here): the ranks are computing, not
        # reading their pipe to the service, so only the kernel's parent-death signal stops
        # them within the second (without it they rendered on for 4.8 s, then saw the pipe
        # close: checked by hand with the prctl removed).
        auth = {"Authorization": f"Bearer {API_KEY}"}
        job = requests.post(f"http://127.0.0.1:{port}/v1/generate", headers=auth, timeout=10,
                            json={**REQ, "size": "96x96", "frames": 33, "steps": 100}).json()
        while requests.get(f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", headers=auth,
                           timeout=10).json()["status"] == "queued":
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed = time.monotonic()
        while time.monotonic() < killed + 1.0 and not all(_dead_or_zombie(p) for p in pids):
            time.sleep(0.05)
        assert all(_dead_or_zombie(p) for p in pids), f"rank processes {pids} outlived the killed service"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            if not _dead_or_zombie(p):
                os.kill(p, signal.SIGKILL)
        log.close()


class _Rank:
    """A rank process as `_boot` and `_loop` see it: alive until `exit()`."""

    def __init__(self, pid: int) -> None:
        import multiprocessing as mp

        self.pid, self.exitcode, self._alive = pid, None, True
        self._ours, self._theirs = mp.Pipe(duplex=False)
        self.sentinel = self._ours.fileno()

    def is_alive(self) -> bool:
        return self._alive

    def exit(self, code: int) -> None:
        self._alive, self.exitcode = False, code
        self._theirs.send("exited")  # makes the sentinel readable, as a real exit does

    def join(self, _timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        if self._alive:
            self.exit(-9)


def _racing_group(make_service: Any, reason: str, rank0_exit: int | None, rank1_exit: int) -> Any:
    """A group of 2 whose rank 0 sends `reason` (and exits with `rank0_exit` unless None) while
    rank 1 exits with `rank1_exit`, all of it right after the service's read of the pipes and
    before its look at the exits: the race CI hit once."""
    import multiprocessing as mp

    service = make_service(device="cpu", gpus_per_clip=2)
    ranks, (service_end, rank0_end) = [_Rank(1001), _Rank(1002)], mp.Pipe()

    def spawn(worker: Any) -> None:
        worker.procs[:], worker.conns[:] = ranks, [service_end, mp.Pipe()[0]]

    real_messages = service._messages

    def messages(worker: Any, timeout: float) -> Any:
        got = real_messages(worker, timeout)
        if ranks[1].is_alive():
            rank0_end.send(("failed", reason))
            if rank0_exit is not None:
                ranks[0].exit(rank0_exit)
            ranks[1].exit(rank1_exit)
        return got

    service._spawn, service._messages = spawn, messages
    return service


def test_the_boot_reads_rank_0s_reason_before_blaming_the_peer_that_exited_on_its_abort(make_service):
    reason = "self-test failed: model: sha256 mismatch"
    service = _racing_group(make_service, reason, rank0_exit=None, rank1_exit=0)
    (w,) = service.workers
    service._boot(w)
    assert w.phase == "failed" and w.reason == reason


def test_a_serving_group_blames_the_rank_that_died_without_a_word(make_service):
    """Rank 0 says why it fails and exits as rank 1 is killed: the cause is rank 1, which said nothing."""
    service = _racing_group(make_service, "rank 0 (cpu): gloo: connection closed by peer", rank0_exit=1, rank1_exit=-9)
    (w,) = service.workers
    service._spawn(w)
    service._loop(w)
    assert w.phase == "failed" and w.reason.startswith("rank 1 (cpu, pid 1002) died (killed by SIGKILL)"), w.reason
