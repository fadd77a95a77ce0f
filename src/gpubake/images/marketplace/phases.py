"""The phases of a launch, with their timings: where a new instance is on its way to a verdict.

scheduled (the marketplace assigns a machine) -> pulling (the image downloads, the container
starts; bytes where the API gives them) -> booting (the container runs, the service does not
answer /health yet) -> self-test (the service answers, the verdict is pending) -> ready (a
pass or degraded verdict). A fail verdict or a dead instance ends in "failed". Phases can be
skipped (a cached image has no visible pull), never revisited: a phase seen again after a
later one is not recorded twice.

Why a module of its own: launch prints them as they happen (stderr), puts them in its
`--json` result, and decides its start deadline from them; the marketplaces only say which
platform phase an instance is in (`Instance.phase`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

ORDER = ("scheduled", "pulling", "booting", "self-test", "ready", "failed")
STARTING = ("scheduled", "pulling")  # before the container runs: bound by --start-timeout


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


@dataclass
class Phase:
    name: str
    started: float  # time.monotonic()
    ended: float | None = None
    pulled: tuple[int, int | None] | None = None  # (bytes done, bytes in all)

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started

    def describe(self, now: float) -> str:
        text = self.name
        if self.pulled:
            done, total = self.pulled
            text += f" {_size(done)}" + (f" of {_size(total)}" if total else "")
        return f"{text} ({self.seconds(now):.0f} s)"


class Timeline:
    """The phases seen so far; `enter` moves on, `to_list` is what `--json` shows."""

    def __init__(self, start: float | None = None) -> None:
        self.t0 = time.monotonic() if start is None else start
        self.phases: list[Phase] = []

    @property
    def current(self) -> Phase | None:
        return self.phases[-1] if self.phases else None

    def enter(self, name: str, *, now: float | None = None, pulled: tuple[int, int | None] | None = None) -> Phase | None:
        """Move to phase `name`; returns the phase that just ended (None when nothing changed)."""
        if name not in ORDER:
            raise ValueError(f"unknown phase {name!r}")
        now = time.monotonic() if now is None else now
        cur = self.current
        if cur is not None and (cur.name == name or (name != "failed" and ORDER.index(name) < ORDER.index(cur.name))):
            if pulled is not None and cur.name == name:
                cur.pulled = pulled
            return None
        if cur is not None:
            cur.ended = now
        self.phases.append(Phase(name, now, pulled=pulled))
        return cur

    def close(self, now: float | None = None) -> None:
        cur = self.current
        if cur is not None and cur.ended is None:
            cur.ended = time.monotonic() if now is None else now

    def in_start(self) -> bool:
        """True while the instance is not running yet (scheduled, pulling)."""
        return self.current is None or self.current.name in STARTING

    def describe(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        cur = self.current
        return f"{cur.describe(now)}, {now - self.t0:.0f} s in all" if cur else "creating"

    def to_list(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.monotonic() if now is None else now
        out = []
        for p in self.phases:
            row: dict[str, Any] = {"phase": p.name, "start_s": round(p.started - self.t0, 2), "seconds": round(p.seconds(now), 2)}
            if p.pulled:
                row["bytes"] = {"done": p.pulled[0], "total": p.pulled[1]}
            out.append(row)
        return out
