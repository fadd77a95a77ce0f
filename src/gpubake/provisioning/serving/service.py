"""The service's state: the self-test, and one worker per GPU, all behind ONE job queue.

Each worker owns one device (`cuda:i`, or the CPU) and its own pipeline. It first runs
its boot self-test on that device (the render stage loads the pipeline, which the worker
then keeps: one load per boot, not two), or, without a self-test, the model files are
checked once against their manifest and every worker loads the pipeline itself. Then
each worker claims jobs one at a time, oldest first, from the SQLite job table under the
data directory (`jobs.JobStore.claim_next`: one transaction, so no job runs twice): a GPU
renders one clip at a time anyway, N GPUs render N clips at once, and the table outlives
the process, so a restart loses no accepted job.

Worker 0 runs the whole self-test (its GPU, every GPU of the host with an all-reduce
across them, the model files, a render, the throughput); the others run the stages of
their own GPU (gpu, kernels, render, throughput). The report the service writes is
worker 0's with every worker in `workers` and the machine's verdict: fail when the model
files fail or no worker passes, degraded when some worker does not pass.

Phases: starting -> verifying (no self-test) | selftest -> ready | failed. Generation is
accepted only when ready (at least one worker ready); `failed` keeps answering /health
and refuses jobs with its reason.
Finished jobs are kept `keep_seconds` and at most `keep_bytes` of outputs, oldest removed first.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpubake.provisioning.manifest import is_disk_full
from gpubake.provisioning.serving.generate import Generator
from gpubake.provisioning.serving.schemas import ResolvedRequest
from gpubake.provisioning.serving.jobs import DB_NAME, JobRecord, JobStore
from gpubake.provisioning.serving.limits import Limits, limits_for

log = logging.getLogger("gpubake.serve")
Phase = Literal["starting", "verifying", "selftest", "ready", "failed"]
KEEP_SECONDS = 24 * 3600
KEEP_BYTES = 20 * 2**30
MIN_FREE_BYTES = 256 * 2**20  # below this on the data dir a job fails at once instead of mid-encode
# (device or None) -> (pipeline, device it runs on): loads the weights without a self-test
PipelineLoader = Callable[[str | None], tuple[Any, str]]


class Refused(Exception):
    """Generation refused for a reason of the service, not of the request."""

    def __init__(self, status_code: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def bind_device(device: str | None) -> None:
    """Make `device` the calling thread's current CUDA device: Triton launches its kernels
    on the current device, whatever device the tensors are on."""
    if device and device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(device)


# Stages of a worker other than the first: its own GPU. The model files and the host's
# GPUs (with the all-reduce) are checked once, by worker 0 (or group 0's rank 0).
WORKER_STAGES_SKIPPED = ("gpus", "model")


def on_device(stage: Any, device: str) -> Any:
    """Self-test `stage` run with `device` current in its thread (the runner gives each stage a thread)."""
    def run(ctx: Any) -> Any:
        bind_device(device)
        return stage.run(ctx)

    return dataclasses.replace(stage, run=run)


@dataclass
class Worker:
    """One device of the service: its self-test, its pipeline, the job it renders."""

    index: int
    device: str | None  # None: the self-test's GPU stage (or the loader) picks cuda or cpu
    selftest: Any | None = None  # smoke_tests.runner.SelfTest on this device
    phase: Phase = "starting"
    reason: str | None = None
    generator: Generator | None = None
    report: Any | None = None  # its smoke_tests.report.Report, while and after it runs
    job_id: str | None = None
    jobs_done: int = 0
    settled: bool = False

    def fail(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        self.phase = "failed"
        log.error("worker %d (%s): %s", self.index, self.device or "auto", self.reason)

    def to_dict(self) -> dict[str, Any]:
        rep = self.report
        tp = rep.throughput() if rep is not None else None
        device = self.device or (self.selftest.ctx.device if self.selftest is not None and self.settled else None)
        return {"index": self.index, "device": device, "status": self.phase, "reason": self.reason,
                "verdict": rep.final_verdict if rep is not None else None,
                "seconds_per_step": (tp or {}).get("seconds_per_step"), "job": self.job_id,
                "jobs_done": self.jobs_done}


def pool_verdict(workers: Sequence[Worker], model_failed: bool) -> str:
    """The machine's verdict from its workers' self-tests: fail when the model files fail
    or no worker passes; degraded when some worker does not pass; else pass."""
    verdicts = [w.report.final_verdict if w.report is not None else "fail" for w in workers]
    if model_failed or all(v == "fail" for v in verdicts):
        return "fail"
    return "pass" if all(v == "pass" for v in verdicts) else "degraded"


def _min_limits(limits: Sequence[Limits]) -> Limits:
    """What every worker can render: a job may land on any of them."""
    low = min(limits, key=lambda lim: lim.max_pixel_frames)
    return dataclasses.replace(low, max_pixel_frame_steps=min(lim.max_pixel_frame_steps for lim in limits),
                               max_steps=min(lim.max_steps for lim in limits))


def execute_job(store: JobStore, generator: Generator, job: JobRecord, data_dir: Path, min_free_bytes: int,
                worker: int) -> None:
    """Render `job` with `generator` into `<data_dir>/jobs/<id>/` and record the outcome in
    `store`: done with its result, or failed with one line (disk full named as such), no
    half-written clip left. Shared by the worker threads and a GPU group's rank 0 (`groups`)."""
    out_dir = data_dir / "jobs" / job.id
    job.status, job.started_at = "running", job.started_at or time.time()
    store.update(job)
    try:
        free = shutil.disk_usage(data_dir).free
        if free < min_free_bytes:
            raise OSError(28, f"{free} bytes free under {data_dir}, need {min_free_bytes}")
        res = generator.run(ResolvedRequest.from_dict(job.request), out_dir)
        job.result = {**res.to_dict(), "worker": worker}
        job.status = "done"
    except Exception as exc:
        if is_disk_full(exc):
            job.error = (f"disk full: no space left under the data directory {data_dir} "
                         f"({' '.join(str(exc).split())[:200]}); free space or lower --keep-gb")
            log.error("job %s: %s", job.id, job.error)
        else:
            log.exception("job %s failed", job.id)
            job.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        job.status = "failed"
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-written clip stays behind
    finally:
        job.finished_at = time.time()
        job.bytes = _tree_bytes(out_dir)
        store.update(job)


class GenerationService:
    """Everything the HTTP app and the serverless handler need, behind plain methods."""

    def __init__(
        self,
        *,
        model: Any,
        data_dir: Path,
        report_path: Path | None = None,
        selftest: Any | None = None,  # smoke_tests.runner.SelfTest of the one worker (legacy form)
        selftests: Sequence[Any] | None = None,  # one SelfTest per worker, worker 0's the whole one
        pipeline_loader: PipelineLoader | None = None,  # used without a self-test, once per worker
        devices: Sequence[str | None] | None = None,  # one per worker (default: one worker, device auto)
        model_dir: Path | None = None,  # checked against its manifest when there is no self-test
        max_queue: int = 16,
        keep_seconds: float = KEEP_SECONDS,
        keep_bytes: int = KEEP_BYTES,
        min_free_bytes: int = MIN_FREE_BYTES,
        max_pixel_frames: int | None = None,
        max_pixel_frame_steps: int | None = None,
    ) -> None:
        self.model = model
        self.data_dir = Path(data_dir)
        self.report_path = report_path
        tests = list(selftests) if selftests is not None else ([selftest] if selftest is not None else [])
        devs = list(devices) if devices is not None else [None] * max(1, len(tests))
        if tests and len(tests) != len(devs):
            raise ValueError(f"{len(tests)} self-tests for {len(devs)} workers")
        self.workers = [Worker(i, d, tests[i] if tests else None) for i, d in enumerate(devs)]
        self.selftest = tests[0] if tests else None
        self.pipeline_loader = pipeline_loader
        self.model_dir = model_dir
        self.max_queue = max_queue
        self.keep_seconds = keep_seconds
        self.keep_bytes = keep_bytes
        self.min_free_bytes = min_free_bytes
        self._limit_overrides = {"max_pixel_frames": max_pixel_frames, "max_pixel_frame_steps": max_pixel_frame_steps}
        self.phase: Phase = "starting"
        self.reason: str | None = None
        self.report: dict[str, Any] | None = None
        self.model_check: dict[str, Any] | None = None
        self.interrupted = 0
        self._store: JobStore | None = None
        self._store_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._prune_lock = threading.Lock()  # workers prune after each job: one at a time
        self._wake = threading.Semaphore(0)  # one token per submitted job: no wake-up is lost
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._preflight_done = threading.Event()
        self._ready = threading.Event()

    @property
    def store(self) -> JobStore:
        """The job table, opened on first use (a dry run builds a service and writes nothing)."""
        with self._store_lock:
            if self._store is None:
                self._store = JobStore(self.data_dir / DB_NAME)
                self.interrupted = self._store.fail_interrupted()
                if self.interrupted:
                    log.warning("%d job(s) were running when the service last stopped: marked failed",
                                self.interrupted)
            return self._store

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def generator(self) -> Generator | None:
        """The first ready worker's (requests are resolved against it: its limits are the pool's)."""
        return next((w.generator for w in self.workers if w.generator is not None and w.phase == "ready"),
                    next((w.generator for w in self.workers if w.generator is not None), None))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self._threads:
            self.store  # noqa: B018 - open it (and fail interrupted jobs) before the first request
            for w in self.workers:
                t = threading.Thread(target=self._run_worker, args=(w,), name=f"gpubake-worker-{w.index}", daemon=True)
                self._threads.append(t)
                t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        for _ in self.workers:
            self._wake.release()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._store is not None and not any(t.is_alive() for t in self._threads):
            self._store.close()
            self._store = None

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until the boot is over (ready or failed)."""
        return self._ready.wait(timeout)

    def _run_worker(self, w: Worker) -> None:
        try:
            bind_device(w.device)
            if w.index == 0:
                try:
                    self._preflight()
                finally:
                    self._preflight_done.set()
            else:
                self._preflight_done.wait()
            if self.phase != "failed":
                self._boot(w)
            else:  # the model check (or an earlier report) refused: no worker loads
                w.phase, w.reason = "failed", f"not started: {self.reason}"
        except Exception as exc:  # a crash at boot must still leave /health answering
            log.exception("boot of worker %d failed", w.index)
            w.fail(f"boot failed: {type(exc).__name__}: {exc}")
        finally:
            self._settle(w)
        self._ready.wait()
        if self.phase == "ready" and w.phase == "ready":
            self._loop(w)

    def _preflight(self) -> None:
        """Once, before any worker loads: without a self-test, the model files against their
        manifest and the report an earlier boot left (its failure still gates generation)."""
        if self.selftest is not None:
            self.phase = "selftest"
            return
        if self.model_dir is not None and not self._verify_model():
            return
        from gpubake.smoke_tests.report import Report, ReportError

        try:
            prior = Report.read(self.report_path) if self.report_path and self.report_path.is_file() else None
        except ReportError as exc:
            self._fail(f"unreadable self-test report: {exc}")
            return
        self.report = prior.to_dict() if prior else None
        if prior and prior.final_verdict == "fail":
            self._fail(f"self-test failed (report {self.report_path}): {prior.summary()}")
            return
        if self.pipeline_loader is None:
            self._fail("no pipeline loader configured")

    def _boot(self, w: Worker) -> None:
        if w.selftest is not None:
            w.phase = "selftest"
            w.selftest.on_update = lambda rep: self._on_report(w, rep)
            rep = w.selftest.run()
            if rep.verdict == "fail":
                bad = next((s for s in rep.stages if s.status == "fail"), None)
                w.fail(f"self-test failed: {bad.name}: {bad.message}" if bad else "self-test failed")
                return
            pipeline, device = w.selftest.ctx.pipeline, w.selftest.ctx.device
        else:
            assert self.pipeline_loader is not None
            pipeline, device = self.pipeline_loader(w.device)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        limits = limits_for(pipeline, device, self.model, **self._limit_overrides)
        w.generator = Generator(pipeline, self.model, limits)
        w.device = device
        log.info("worker %d ready: %s on %s; limits %s", w.index, self.model.id, device, limits)
        w.phase = "ready"

    def _settle(self, w: Worker) -> None:
        """Worker `w` is done booting; the last one decides the service's phase."""
        with self._report_lock:
            w.settled = True
            if not all(x.settled for x in self.workers):
                return
        ready = [x for x in self.workers if x.phase == "ready"]
        model_failed = self._model_failed()
        if self.phase != "failed":
            if model_failed:
                self._fail(next(x.reason for x in self.workers if x.index == 0) or "model check failed")
            elif not ready:
                self._fail(self.workers[0].reason if len(self.workers) == 1 else "every worker failed: " + "; ".join(
                    f"worker {x.index} ({x.device or 'auto'}): {x.reason}" for x in self.workers))
            else:
                pool = _min_limits([x.generator.limits for x in ready if x.generator is not None])
                for x in ready:
                    assert x.generator is not None
                    x.generator.limits = pool
                self.phase = "ready"
                if len(ready) < len(self.workers):
                    log.warning("serving on %d of %d workers", len(ready), len(self.workers))
        if self.workers[0].report is not None:
            self._publish()
        self._ready.set()

    def _model_failed(self) -> bool:
        rep = self.workers[0].report
        stage = rep.stage("model") if rep is not None else None
        return stage is not None and stage.status == "fail"

    def _on_report(self, w: Worker, rep: Any) -> None:
        w.report = rep
        self._publish()

    def _publish(self) -> None:
        """Worker 0's report with every worker in it: running until all workers are done,
        then the pool's verdict (a single worker's report is its own)."""
        with self._report_lock:
            primary = self.workers[0].report
            if primary is None:
                return
            rep = dataclasses.replace(primary, workers=[w.to_dict() for w in self.workers])
            if len(self.workers) > 1:
                if all(w.settled for w in self.workers):
                    rep.finish()
                    rep.verdict = pool_verdict(self.workers, self._model_failed())  # type: ignore[assignment]
                else:
                    rep.state, rep.verdict, rep.finished_at = "running", None, None
            self.report = rep.to_dict()
            if self.report_path is not None:
                rep.write(self.report_path)

    def _verify_model(self) -> bool:
        """Sizes always, hashes once per file version (modelverify); False: phase failed."""
        from gpubake.provisioning.serving.modelverify import CACHE_NAME, verify_model_dir

        assert self.model_dir is not None
        self.phase = "verifying"
        check = verify_model_dir(self.model_dir, self.data_dir / CACHE_NAME)
        self.model_check = check.to_dict()
        if check.problems:
            more = f" (and {len(check.problems) - 1} more)" if len(check.problems) > 1 else ""
            self._fail(f"model check failed: {check.problems[0]}{more}")
            return False
        log.info("model files match the manifest: %d files, %d hashed, %d unchanged since their last hash",
                 check.files, check.hashed_files, check.cached_files)
        return True

    def _fail(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        self.phase = "failed"
        log.error("generation disabled: %s", self.reason)

    def _loop(self, w: Worker) -> None:
        self._prune()
        while not self._stopping:
            try:
                job = self.store.claim_next()
                if job is None:
                    self._wake.acquire(timeout=1.0)
                    continue
                self.run_job(job, w)
                self._prune()
            except Exception:  # e.g. the database on a full disk: keep the worker alive, retry
                log.exception("job loop of worker %d", w.index)
                time.sleep(1.0)

    def run_job(self, job: JobRecord, worker: Worker | None = None) -> None:
        """Render one job on the calling thread (a worker, or the serverless handler: the
        first ready worker's pipeline)."""
        w = worker or next((x for x in self.workers if x.phase == "ready"), self.workers[0])
        assert w.generator is not None
        w.job_id = job.id
        try:
            execute_job(self.store, w.generator, job, self.data_dir, self.min_free_bytes, w.index)
        finally:
            w.job_id = None
            w.jobs_done += 1

    def _prune(self) -> None:
        """Remove finished jobs (records and files) older than keep_seconds, then the
        oldest while their outputs exceed keep_bytes."""
        with self._prune_lock:
            self._prune_locked()

    def _prune_locked(self) -> None:
        now = time.time()
        finished = self.store.finished()
        total = sum(j.bytes for j in finished)
        for job in finished:
            if (job.finished_at or now) >= now - self.keep_seconds and total <= self.keep_bytes:
                continue
            shutil.rmtree(self.jobs_dir / job.id, ignore_errors=True)
            self.store.delete(job.id)
            total -= job.bytes

    # ------------------------------------------------------------------ API

    def health(self, full: bool = True) -> dict[str, Any]:
        """Liveness and the verdict for anyone; the rest (report, paths, queue) with the key."""
        body: dict[str, Any] = {
            "status": self.phase,
            "ready": self.phase == "ready",
            "verdict": (self.report or {}).get("verdict"),
        }
        if not full:
            return body
        body.update({
            "reason": self.reason,
            "model_id": self.model.id,
            "queue": {"waiting": self.store.count("queued"), "running": self.store.count("running"),
                      "capacity": self.max_queue},
            "limits": self.generator.limits.to_dict() if self.generator else None,
            "model_check": self.model_check,
            "workers": [w.to_dict() for w in self.workers],
            "selftest": self.report,
        })
        return body

    def info(self) -> dict[str, Any]:
        gen = self.generator
        return {"model_id": self.model.id, "phase": self.phase, "defaults": gen.defaults() if gen else None,
                "limits": gen.limits.to_dict() if gen else None}

    def check_accepting(self) -> None:
        if self.phase == "failed":
            raise Refused(503, f"generation disabled on this machine: {self.reason} (see GET /health)")
        if self.phase != "ready":
            what = "model check" if self.phase == "verifying" else "self-test"
            raise Refused(503, f"{what} in progress; generation opens when it passes (see GET /health)", 10)

    def submit(self, args: ResolvedRequest) -> JobRecord:
        self.check_accepting()
        job = JobRecord(id=uuid.uuid4().hex, request=args.to_dict())
        with self._submit_lock:
            try:
                added = self.store.add_if_room(job, self.max_queue)
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise Refused(507, f"disk full: cannot record the job under {self.data_dir}; retry later", 60) from None
                raise
        if not added:
            raise Refused(429, f"queue full ({self.max_queue} jobs waiting); retry later", 30)
        self._wake.release()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def video_path(self, job: JobRecord) -> Path:
        return self.jobs_dir / job.id / "video.mp4"
