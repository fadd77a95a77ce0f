"""Job records in SQLite (stdlib `sqlite3`, WAL) under the data directory.

The table is also the queue: each GPU worker claims the oldest `queued` row
(`claim_next`, one transaction), so jobs
accepted before a restart still run after it. A job found `running` at startup was cut
off by the process dying and is marked failed with that reason. One connection, used
under a lock: the HTTP threads and the worker each hold it only for one statement.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

JobStatus = Literal["queued", "running", "done", "failed"]
DB_NAME = "jobs.sqlite3"
INTERRUPTED = "the service stopped while this job was running (process restarted at {when}); submit it again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    result TEXT,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
"""


@dataclass
class JobRecord:
    """One row: the resolved request (ResolvedRequest as a dict) and what became of it."""

    id: str
    request: dict[str, Any]
    status: JobStatus = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "status": self.status, "request": self.request,
                             "created_at": self.created_at, "started_at": self.started_at,
                             "finished_at": self.finished_at}
        if self.error:
            d["error"] = self.error
        if self.result:
            d["result"] = {k: v for k, v in self.result.items() if k not in ("video", "first_frame")}
        return d


_COLUMNS = "id, status, request, created_at, started_at, finished_at, error, result, bytes"


def _row(r: tuple[Any, ...]) -> JobRecord:
    return JobRecord(id=r[0], status=r[1], request=json.loads(r[2]), created_at=r[3], started_at=r[4],
                     finished_at=r[5], error=r[6], result=json.loads(r[7]) if r[7] else None, bytes=r[8])


class JobStore:
    """The jobs table of one data directory."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _cursor(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            yield self._db.cursor()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, job: JobRecord) -> None:
        with self._cursor() as c:
            c.execute(f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (job.id, job.status, json.dumps(job.request), job.created_at, job.started_at,
                       job.finished_at, job.error, json.dumps(job.result) if job.result else None, job.bytes))

    def add_if_room(self, job: JobRecord, max_queued: int) -> bool:
        """Insert `job` unless `max_queued` jobs already wait (one transaction)."""
        with self._cursor() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                (waiting,) = c.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
                if waiting >= max_queued:
                    c.execute("ROLLBACK")
                    return False
                c.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (job.id, job.status, json.dumps(job.request), job.created_at, None, None, None, None, 0))
                c.execute("COMMIT")
                return True
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def update(self, job: JobRecord) -> None:
        with self._cursor() as c:
            c.execute("UPDATE jobs SET status = ?, started_at = ?, finished_at = ?, error = ?, result = ?, bytes = ? "
                      "WHERE id = ?", (job.status, job.started_at, job.finished_at, job.error,
                                       json.dumps(job.result) if job.result else None, job.bytes, job.id))

    def get(self, job_id: str) -> JobRecord | None:
        with self._cursor() as c:
            r = c.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(r) if r else None

    def next_queued(self) -> JobRecord | None:
        with self._cursor() as c:
            r = c.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1"
                          ).fetchone()
        return _row(r) if r else None

    def claim_next(self, now: float | None = None) -> JobRecord | None:
        """Take the oldest queued job for one worker: marked running in ONE transaction
        (`UPDATE ... WHERE status = 'queued'`), so two workers, threads or processes on this
        table never get the same job. None: nothing waits."""
        now = time.time() if now is None else now
        with self._cursor() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                r = c.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1"
                              ).fetchone()
                took = r is not None and c.execute(
                    "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
                    (now, r[0])).rowcount == 1
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        if not took:
            return None
        job = _row(r)
        job.status, job.started_at = "running", now
        return job

    def count(self, status: JobStatus) -> int:
        with self._cursor() as c:
            return int(c.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0])

    def finished(self) -> list[JobRecord]:
        """Done and failed jobs, oldest finish first (the order they are pruned in)."""
        with self._cursor() as c:
            rows = c.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('done', 'failed') "
                             "ORDER BY finished_at, rowid").fetchall()
        return [_row(r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self._cursor() as c:
            c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def fail_interrupted(self, now: float | None = None) -> int:
        """Mark jobs left `running` by a dead process failed, with the reason; returns how many."""
        now = time.time() if now is None else now
        why = INTERRUPTED.format(when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
        with self._cursor() as c:
            cur = c.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE status = 'running'",
                            (why, now))
            return cur.rowcount
