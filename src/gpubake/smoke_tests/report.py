"""The self-test report: stage results, the verdict, where the JSON lives, how it is read.

The report is the contract between the self-test, the service's `/health`, the start
script and `gpubake launch`/`remote selftest` (which read it back over HTTP or SSH), so
it is plain JSON with a schema version, always written atomically. This module owns all
of it: the schema (`Report`, `StageResult`), the states, the exit codes, the default path,
the writer (`Report.write`) and, beside it, the one reader (`Report.from_json`,
`Report.read`) that every consumer uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpubake import __version__, envs
from gpubake.errors import GpubakeError
from gpubake.fsutil import write_json_atomic

if TYPE_CHECKING:  # pydantic is imported when a report is read, not by every CLI start
    from pydantic import TypeAdapter

SCHEMA_VERSION = 1
# Fields added to schema 1 after its first release, each with a default: a report written
# before them still reads (the reader fills the default), so the version stays 1.
OPTIONAL_FIELDS = frozenset({"gpus", "workers"})
Status = Literal["pass", "warn", "fail", "skip"]
Verdict = Literal["pass", "degraded", "fail"]
State = Literal["running", "done"]
IN_PROGRESS = "in_progress"  # what a reader says of a report without a verdict yet

# Exit codes of `gpubake selftest`; 2 stays the CLI's code for bad input.
EXIT_CODES: dict[str, int] = {"pass": 0, "degraded": 1, "fail": 3}
# Exit codes of the commands that wait for a verdict (`launch`): no verdict in time is 4.
WAIT_EXIT_CODES: dict[str, int] = {**EXIT_CODES, "timeout": 4}


class ReportError(GpubakeError):
    """A report file or body is missing, not JSON, or not a report of this schema."""

REPORT_ENV = "GPUBAKE_REPORT"
WORKSPACE_REPORT = Path("/workspace/gpubake/selftest.json")


def default_report_path() -> Path:
    """$GPUBAKE_REPORT, else /workspace/gpubake/selftest.json where /workspace exists
    (RunPod and Vast.ai mount it), else ~/.cache/gpubake/selftest.json."""
    env = envs.raw(REPORT_ENV)
    if env:
        return Path(env)
    if WORKSPACE_REPORT.parent.parent.is_dir():
        return WORKSPACE_REPORT
    return Path.home() / ".cache" / "gpubake" / "selftest.json"


@dataclass
class StageResult:
    """One stage: its status, a one-line message, what it measured, how long it took."""

    name: str
    status: Status
    message: str
    values: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    limit_seconds: float | None = None


def verdict_of(stages: list[StageResult]) -> Verdict:
    """Any failed stage fails the machine; any warning degrades it; else it passes."""
    statuses = {s.status for s in stages}
    if "fail" in statuses:
        return "fail"
    if "warn" in statuses:
        return "degraded"
    return "pass"


@dataclass
class Report:
    """The whole self-test: `state` is running until the verdict is in."""

    image: str
    model_id: str | None
    options: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    state: State = "running"
    verdict: Verdict | None = None
    mode: Literal["gpu", "cpu"] | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    boot_to_verdict_seconds: float | None = None
    hostname: str = field(default_factory=socket.gethostname)
    gpubake_version: str = __version__
    # every GPU of the host, each with its own checks and whether torch can use it (the
    # "gpus" stage: `GpuInfo.to_dict()` + status, notes, visible, cuda_index)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    # the service's workers, one per GPU it serves on (index, device, status, verdict, reason,
    # seconds_per_step); empty for `gpubake selftest`, which renders on one device
    workers: list[dict[str, Any]] = field(default_factory=list)

    def finish(self) -> None:
        """Set the verdict and the timings (boot epoch from the start script, if any)."""
        self.verdict = verdict_of(self.stages)
        self.state = "done"
        self.finished_at = time.time()
        boot = envs.raw("GPUBAKE_BOOT_EPOCH")
        if boot:
            try:
                self.boot_to_verdict_seconds = round(self.finished_at - float(boot), 2)
            except ValueError:
                self.boot_to_verdict_seconds = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict] if self.verdict else EXIT_CODES["fail"]

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)

    def summary(self) -> str:
        """A short human summary: the verdict, then one line per stage."""
        head = f"self-test {self.verdict.upper() if self.verdict else 'RUNNING'}: image {self.image}"
        if self.mode:
            head += f", {self.mode} mode"
        if self.finished_at:
            head += f", {self.finished_at - self.started_at:.1f} s"
        lines = [head]
        for s in self.stages:
            lines.append(f"  {s.status.upper():4} {s.name:10} {s.message} ({s.seconds:.1f} s)")
        for w in self.workers if len(self.workers) > 1 else ():
            what = w.get("reason") or (f"{w['seconds_per_step']:.3f} s/step" if w.get("seconds_per_step") else "")
            lines.append(f"  {str(w.get('verdict') or w.get('status')).upper():4} worker {w.get('index')} "
                         f"{w.get('device')} {what}".rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema_version"] = SCHEMA_VERSION
        d["summary"] = self.summary()
        d["seconds"] = round((self.finished_at or time.time()) - self.started_at, 3)
        return d

    def write(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_dict())

    # ------------------------------------------------------------------ reading

    @property
    def final_verdict(self) -> Verdict | None:
        """The verdict once the run is over; None while it is running."""
        return self.verdict if self.state == "done" else None

    @property
    def outcome(self) -> str:
        """pass | degraded | fail, or in_progress while the run is not over."""
        return self.final_verdict or IN_PROGRESS

    def throughput(self) -> dict[str, Any] | None:
        """The throughput stage's status, message and measured values (seconds per step ...)."""
        stage = self.stage("throughput")
        return {"status": stage.status, "message": stage.message, **stage.values} if stage else None

    @classmethod
    def from_json(cls, data: Any, *, where: str = "report") -> Report:
        """A report as `to_dict` wrote it (the inverse of the writer).

        Every field of the schema must be there, but those of `OPTIONAL_FIELDS` (added later,
        with defaults); keys a newer writer adds are ignored. Anything else is one
        `ReportError` line naming `where` and the field.
        """
        if not isinstance(data, dict):
            raise ReportError(f"{where}: a self-test report is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReportError(f"{where}: schema_version: {version!r} (this gpubake reads {SCHEMA_VERSION})")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name not in OPTIONAL_FIELDS]
        if missing:
            raise ReportError(f"{where}: {missing[0]}: missing required field")
        from pydantic import ValidationError

        try:
            report = _adapter().validate_python(data)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            raise ReportError(f"{where}: {loc}: {err.get('msg')}") from None
        if report.state == "done" and report.verdict is None:
            raise ReportError(f"{where}: verdict: missing on a finished report")
        return report

    @classmethod
    def read(cls, path: str | os.PathLike[str], *, where: str | None = None) -> Report:
        """The report file at `path` (named `where` in errors, default the path); a missing,
        unreadable or invalid one is a `ReportError`."""
        where = where or str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReportError(f"{where}: no self-test report") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"{where}: cannot read the self-test report: {exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ReportError(f"{where}: the self-test report is not JSON ({exc})") from None
        return cls.from_json(data, where=where)


@cache
def _adapter() -> TypeAdapter[Report]:
    from pydantic import TypeAdapter

    return TypeAdapter(Report)
