"""Where buildah and skopeo keep images: a gpubake-owned containers-storage, vfs driver.

Why our own store: the host's default store may already be set up with another driver
(overlay), which vfs cannot share, and tests must not collide with a user's images. vfs
works everywhere (no kernel overlay inside containers, no fuse), at the cost of disk.
`GPUBAKE_STORAGE_ROOT` moves the store (tests give each session its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/gpubake (or $XDG_CACHE_HOME/gpubake, or $GPUBAKE_CACHE)."""
    if os.environ.get("GPUBAKE_CACHE"):
        return Path(os.environ["GPUBAKE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gpubake"


@dataclass(frozen=True)
class Storage:
    """A containers-storage location shared by buildah and skopeo."""

    root: Path
    runroot: Path
    driver: str = "vfs"

    def buildah_args(self) -> list[str]:
        """Global buildah flags selecting this store."""
        return ["--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", self.driver]

    def ref(self, name: str) -> str:
        """A skopeo `containers-storage:` reference to `name` inside this store."""
        return f"containers-storage:[{self.driver}@{self.root}+{self.runroot}]{name}"


def default_storage() -> Storage:
    """The store in $GPUBAKE_STORAGE_ROOT, else ~/.cache/gpubake/containers."""
    root = Path(os.environ.get("GPUBAKE_STORAGE_ROOT") or cache_root() / "containers")
    return Storage(root=root / "storage", runroot=root / "run")
