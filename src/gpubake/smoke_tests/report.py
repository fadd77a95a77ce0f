"""The self-test report: stage results, the verdict, where the JSON lives.

The report is the contract between the self-test, the service's `/health`, the start
script and `gpubake launch`/`remote selftest` (which read it back over HTTP or SSH), so
it is plain JSON with a schema version, always written atomically.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpubake import __version__, envs
from gpubake.fsutil import write_json_atomic

SCHEMA_VERSION = 1
Status = Literal["pass", "warn", "fail", "skip"]
Verdict = Literal["pass", "degraded", "fail"]

# Exit codes of `gpubake selftest`; 2 stays the CLI's code for bad input.
EXIT_CODES: dict[str, int] = {"pass": 0, "degraded": 1, "fail": 3}

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
    state: Literal["running", "done"] = "running"
    verdict: Verdict | None = None
    mode: Literal["gpu", "cpu"] | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    boot_to_verdict_seconds: float | None = None
    hostname: str = field(default_factory=socket.gethostname)
    gpubake_version: str = __version__

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
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema_version"] = SCHEMA_VERSION
        d["summary"] = self.summary()
        d["seconds"] = round((self.finished_at or time.time()) - self.started_at, 3)
        return d

    def write(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_dict())
