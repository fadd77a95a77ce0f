"""The service's state: the self-test, the pipeline, and ONE GPU worker thread.

The worker thread first runs the boot self-test (its render stage loads the pipeline,
which the service then keeps: one load per boot, not two), then takes jobs from a
bounded queue one at a time: a GPU renders one clip at a time anyway, and a second
concurrent clip would only split memory and time between them.

Phases: starting -> selftest -> ready | failed. Generation is accepted only when ready;
`failed` keeps answering /health with the report and refuses jobs with its reason.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpubake.provisioning.serving.generate import Generator, RenderArgs

log = logging.getLogger("gpubake.serve")
Phase = Literal["starting", "selftest", "ready", "failed"]
JobStatus = Literal["queued", "running", "done", "failed"]


class Refused(Exception):
    """Generation refused for a reason of the service, not of the request."""

    def __init__(self, status_code: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


@dataclass
class Job:
    id: str
    args: RenderArgs
    out_dir: Path
    status: JobStatus = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None

    @property
    def video(self) -> Path:
        return self.out_dir / "video.mp4"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "request": self.args.to_dict(),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.error:
            d["error"] = self.error
        if self.result:
            d["result"] = {k: v for k, v in self.result.items() if k not in ("video", "first_frame")}
        return d


class GenerationService:
    """Everything the HTTP app and the serverless handler need, behind plain methods."""

    def __init__(
        self,
        *,
        model: Any,
        out_dir: Path,
        report_path: Path | None = None,
        selftest: Any | None = None,  # smoke_tests.runner.SelfTest, run on the worker first
        pipeline_loader: Callable[[], tuple[Any, str]] | None = None,  # used without a self-test
        max_queue: int = 16,
        keep_jobs: int = 100,
    ) -> None:
        self.model = model
        self.out_dir = Path(out_dir)
        self.report_path = report_path
        self.selftest = selftest
        self.pipeline_loader = pipeline_loader
        self.keep_jobs = keep_jobs
        self.phase: Phase = "starting"
        self.reason: str | None = None
        self.report: dict[str, Any] | None = None
        self.generator: Generator | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="gpubake-gpu-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout)

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until the self-test is over (ready or failed)."""
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
        self.generator = Generator(pipeline, self.model)
        log.info("ready: %s on %s", self.model.id, device)
        self.phase = "ready"

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
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """Render one job on the calling thread (the worker, or the serverless handler)."""
        assert self.generator is not None
        job.status, job.started_at = "running", time.time()
        try:
            res = self.generator.run(job.args, job.out_dir)
            job.result = res.to_dict()
            job.status = "done"
        except Exception as exc:
            log.exception("job %s failed", job.id)
            job.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            job.status = "failed"
        finally:
            job.finished_at = time.time()

    # ------------------------------------------------------------------ API

    def health(self) -> dict[str, Any]:
        return {
            "status": self.phase,
            "ready": self.phase == "ready",
            "verdict": (self.report or {}).get("verdict"),
            "reason": self.reason,
            "model_id": self.model.id,
            "queue": {"waiting": self._queue.qsize(), "capacity": self._queue.maxsize},
            "selftest": self.report,
        }

    def info(self) -> dict[str, Any]:
        gen = self.generator
        defaults = gen.defaults() if gen else None
        return {"model_id": self.model.id, "defaults": defaults, "phase": self.phase}

    def check_accepting(self) -> None:
        if self.phase == "failed":
            raise Refused(503, f"generation disabled on this machine: {self.reason} (see GET /health)")
        if self.phase != "ready":
            raise Refused(503, "self-test in progress; generation opens when it passes (see GET /health)", 10)

    def submit(self, args: RenderArgs) -> Job:
        self.check_accepting()
        job = Job(id=uuid.uuid4().hex, args=args, out_dir=self.out_dir / "jobs")
        job.out_dir = job.out_dir / job.id
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise Refused(429, f"queue full ({self._queue.maxsize} jobs waiting); retry later", 30) from None
            self._jobs[job.id] = job
            self._evict()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def _evict(self) -> None:
        """Forget the oldest finished jobs (and delete their files) beyond keep_jobs."""
        finished = [j for j in self._jobs.values() if j.status in ("done", "failed")]
        for job in finished[: max(0, len(self._jobs) - self.keep_jobs)]:
            self._jobs.pop(job.id, None)
            shutil.rmtree(job.out_dir, ignore_errors=True)
