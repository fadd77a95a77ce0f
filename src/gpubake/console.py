"""One place for human output (rich, on stderr) and machine output (JSON, on stdout).

Commands print progress and summaries through `console` (stderr) so that `--json`
output on stdout stays a single parseable object.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True, highlight=False)


def step_progress() -> Progress:
    """Progress for a sequence of named steps (build stages, self-test stages)."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False)


def transfer_progress() -> Progress:
    """Progress for byte transfers (fetch, push, export)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def emit_json(obj: Any) -> None:
    """Write the command's one JSON result object to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
