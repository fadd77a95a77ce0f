"""Run a build plan: each step's tool with its output in a log file, failures as one-line `BuildError`s.

Builds print thousands of lines; users get a progress line and the log path, and the
error names the tool, the last meaningful line of its output and where the full log is.
Everything written to the log passes through `gpubake.secrets.redact`. `execute(steps)` is
how every builder runs its `plan(req)`; the process runner it calls (`run_step` unless one
is passed) is the one seam where a test records, or replaces, the commands a build issues.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from gpubake.errors import BuildError
from gpubake.images.builders.base import ProgressFn, Step
from gpubake.secrets import redact

# A process runner: runs one step's command, output to the log, each line to `on_line`;
# returns the (redacted) output, raises `BuildError` (`CommandFailed` for a non-zero exit).
Runner = Callable[[Step, Path, "Callable[[str], None] | None"], str]

# Lines that say nothing about why a tool failed.
_NOISE = ("level=warning", "WARN[", "Getting image source signatures", "Writing manifest", "Storing signatures")


def last_meaningful_line(text: str) -> str:
    """The last line of tool output that explains something (skips blank and noise)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not any(n in line for n in _NOISE):
            return line[:300]
    return "no output"


class CommandFailed(BuildError):
    """A command exited non-zero; `output` is what it printed (redacted), for `Step.explain`."""

    def __init__(self, message: str, *, rc: int, output: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.output = output


def run_logged(
    cmd: Sequence[str],
    *,
    log_file: Path,
    what: str,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    stdout_only: bool = False,
) -> str:
    """Run `cmd`, append its redacted output to `log_file`, return the output.

    `on_line` sees each line as it arrives (progress). With `stdout_only`, stderr goes to
    the log unread (the output is data). A missing executable raises `BuildError`, a
    non-zero exit `CommandFailed`, naming `what`, the last output line and the log.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    lines: list[str] = []
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(redact("$ " + " ".join(cmd)) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdout=subprocess.PIPE,
                stderr=log if stdout_only else subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                text=True,
                errors="replace",
            )
        except FileNotFoundError:
            raise BuildError(f"{what}: {cmd[0]} is not installed (run scripts/setup.sh)") from None
        assert proc.stdout is not None
        started = time.monotonic()
        for line in proc.stdout:
            clean = redact(line)
            if clean.startswith("STEP "):  # step timings, for docs/building.md numbers
                log.write(f"# +{time.monotonic() - started:.1f}s\n")
            log.write(clean)
            lines.append(line if stdout_only else clean)  # data (a manifest) comes back as it was
            if on_line is not None:
                on_line(clean.rstrip("\n"))
        rc = proc.wait()
        log.write(f"# exit {rc}\n")
    output = "".join(lines)
    if rc != 0:
        said = output + (_tail(log_file) if stdout_only else "")
        if "no space left on device" in said.lower():
            raise CommandFailed(f"{what} failed: no space left on device (full log: {log_file})", rc=rc, output=output)
        detail = last_meaningful_line(said)
        raise CommandFailed(f"{what} failed (exit {rc}): {detail} (full log: {log_file})", rc=rc, output=output)
    return output


def _tail(log_file: Path, size: int = 4096) -> str:
    """The end of the log (where a `stdout_only` command's stderr went), without our exit line."""
    with open(log_file, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - size))
        text = fh.read().decode(errors="replace")
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("# exit "))


def run_step(step: Step, log_file: Path, on_line: Callable[[str], None] | None = None) -> str:
    """The process runner: one step's command through `run_logged`."""
    return run_logged(
        step.argv, log_file=log_file, what=step.what, env=step.env, on_line=on_line, cwd=step.cwd, stdout_only=step.stdout_only
    )


def execute(
    steps: Iterable[Step],
    *,
    log_file: Path,
    runner: Runner | None = None,
    on_progress: ProgressFn | None = None,
) -> None:
    """Run `steps` in order with their hooks; on any failure undo what the run left behind."""
    run = runner or run_step  # looked up now: a test may swap the module's run_step
    undo: list[Callable[[], None]] = []
    try:
        for step in steps:
            if step.before is not None:
                step.before()
            if step.undo is not None:
                undo.append(step.undo)
            if on_progress is not None:
                on_progress(step.what)
            on_line = _line_handler(step, on_progress)
            try:
                output = run(step, log_file, on_line)
            except CommandFailed as exc:
                if step.explain is None:
                    raise
                raise step.explain(exc) from None
            if step.then is not None:
                step.then(output)
    except BaseException:
        for fn in reversed(undo):
            with contextlib.suppress(OSError):
                fn()
        raise


def _line_handler(step: Step, on_progress: ProgressFn | None) -> Callable[[str], None] | None:
    if step.watch is None:
        return None
    watch = step.watch

    def on_line(line: str) -> None:
        message = watch(line)
        if message and on_progress is not None:
            on_progress(message)

    return on_line
