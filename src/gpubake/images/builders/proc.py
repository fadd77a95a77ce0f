"""Run a build tool with its output in a log file and failures as one-line `BuildError`s.

Builds print thousands of lines; users get a progress line and the log path, and the
error names the tool, the last meaningful line of its output and where the full log is.
Everything written to the log passes through `gpubake.secrets.redact`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gpubake.errors import BuildError
from gpubake.secrets import redact

# Lines that say nothing about why a tool failed.
_NOISE = ("level=warning", "WARN[", "Getting image source signatures", "Writing manifest", "Storing signatures")


def last_meaningful_line(text: str) -> str:
    """The last line of tool output that explains something (skips blank and noise)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not any(n in line for n in _NOISE):
            return line[:300]
    return "no output"


def run_logged(
    cmd: Sequence[str],
    *,
    log_file: Path,
    what: str,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run `cmd`, append its redacted output to `log_file`, return the output.

    `on_line` sees each line as it arrives (progress). A missing executable or a
    non-zero exit raises `BuildError` naming `what`, the last output line and the log.
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
                stderr=subprocess.STDOUT,
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
            lines.append(clean)
            if on_line is not None:
                on_line(clean.rstrip("\n"))
        rc = proc.wait()
        log.write(f"# exit {rc}\n")
    output = "".join(lines)
    if rc != 0:
        if "no space left on device" in output.lower():
            raise BuildError(f"{what} failed: no space left on device (full log: {log_file})")
        raise BuildError(f"{what} failed (exit {rc}): {last_meaningful_line(output)} (full log: {log_file})")
    return output
