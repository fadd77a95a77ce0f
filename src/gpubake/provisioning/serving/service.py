"""The service's state: the self-test, the pipeline, and ONE GPU worker thread.

The worker thread first runs the boot self-test (its render stage loads the pipeline,
which the service then keeps: one load per boot, not two), or, without a self-test,
checks the model files against their manifest and loads the pipeline itself. Then it
takes jobs one at a time, oldest first, from the SQLite job table under the data
directory (`jobs.JobStore`): a GPU renders one clip at a time anyway, and the table
outlives the process, so a restart loses no accepted job.

Phases: starting -> verifying (no self-test) | selftest -> ready | failed. Generation is
accepted only when ready; `failed` keeps answering /health and refuses jobs with its reason.
Finished jobs are kept `keep_seconds` and at most `keep_bytes` of outputs, oldest removed first.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from gpubake.provisioning.manifest import is_disk_full
from gpubake.provisioning.serving.generate import Generator, RenderArgs
from gpubake.provisioning.serving.jobs import DB_NAME, JobRecord, JobStore
from gpubake.provisioning.serving.limits import limits_for

log = logging.getLogger("gpubake.serve")
Phase = Literal["starting", "verifying", "selftest", "ready", "failed"]
KEEP_SECONDS = 24 * 3600
KEEP_BYTES = 20 * 2**30
MIN_FREE_BYTES = 256 * 2**20  # below this on the data dir a job fails at once instead of mid-encode


class Refused(Exception):
    """Generation refused for a reason of the service, not of the request."""

    def __init__(self, status_code: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class GenerationService:
    """Everything the HTTP app and the serverless handler need, behind plain methods."""

    def __init__(
        self,
        *,
        model: Any,
        data_dir: Path,
        report_path: Path | None = None,
        selftest: Any | None = None,  # smoke_tests.runner.SelfTest, run on the worker first
        pipeline_loader: Callable[[], tuple[Any, str]] | None = None,  # used without a self-test
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
        self.selftest = selftest
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
        self.generator: Generator | None = None
        self.interrupted = 0
        self._store: JobStore | None = None
        self._store_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
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

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self.store  # noqa: B018 - open it (and fail interrupted jobs) before the first request
            self._thread = threading.Thread(target=self._work, name="gpubake-gpu-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._store is not None and not (self._thread and self._thread.is_alive()):
            self._store.close()
            self._store = None

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until the boot is over (ready or failed)."""
        return self._ready.wait(timeout)

    def _on_report(self, rep: Any) -> None:
        self.report = rep.to_dict()
        if self.report_path is not None:
            rep.write(self.report_path)

    def _boot(self) -> None:
        if self.selftest is not None:
            self.phase = "selftest"
            self.selftest.on_update = self._on_report
            rep = self.selftest.run()
            if rep.verdict == "fail":
                bad = next((s for s in rep.stages if s.status == "fail"), None)
                self._fail(f"self-test failed: {bad.name}: {bad.message}" if bad else "self-test failed")
                return
            pipeline, device = self.selftest.ctx.pipeline, self.selftest.ctx.device
        else:
            if self.model_dir is not None and not self._verify_model():
                return
            from gpubake.smoke_tests.report import Report, ReportError

            try:  # a report an earlier boot left: its failure still gates generation
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
                return
            pipeline, device = self.pipeline_loader()
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        limits = limits_for(pipeline, device, self.model, **self._limit_overrides)
        self.generator = Generator(pipeline, self.model, limits)
        log.info("ready: %s on %s; limits %s", self.model.id, device, limits)
        self.phase = "ready"

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

    def _work(self) -> None:
        try:
            self._boot()
        except Exception as exc:  # a crash at boot must still leave /health answering
            log.exception("boot failed")
            self._fail(f"boot failed: {type(exc).__name__}: {exc}")
        finally:
            self._ready.set()
        if self.phase != "ready":
            return
        self._prune()
        while not self._stopping:
            try:
                job = self.store.next_queued()
                if job is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self.run_job(job)
                self._prune()
            except Exception:  # e.g. the database on a full disk: keep the worker alive, retry
                log.exception("job loop")
                time.sleep(1.0)

    def run_job(self, job: JobRecord) -> None:
        """Render one job on the calling thread (the worker, or the serverless handler)."""
        assert self.generator is not None
        out_dir = self.jobs_dir / job.id
        job.status, job.started_at = "running", time.time()
        self.store.update(job)
        try:
            free = shutil.disk_usage(self.data_dir).free
            if free < self.min_free_bytes:
                raise OSError(28, f"{free} bytes free under {self.data_dir}, need {self.min_free_bytes}")
            res = self.generator.run(RenderArgs.from_dict(job.request), out_dir)
            job.result = res.to_dict()
            job.status = "done"
        except Exception as exc:
            if is_disk_full(exc):
                job.error = (f"disk full: no space left under the data directory {self.data_dir} "
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
            self.store.update(job)

    def _prune(self) -> None:
        """Remove finished jobs (records and files) older than keep_seconds, then the
        oldest while their outputs exceed keep_bytes."""
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

    def submit(self, args: RenderArgs) -> JobRecord:
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
        self._wake.set()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def video_path(self, job: JobRecord) -> Path:
        return self.jobs_dir / job.id / "video.mp4"
