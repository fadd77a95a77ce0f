"""Where buildah and skopeo keep images: a gpubake-owned containers-storage.

Why our own store: the host's default store may be set up with another driver, and tests
must not collide with a user's images. The driver is vfs (works everywhere: no kernel
overlay mount inside containers) unless `GPUBAKE_STORAGE_DRIVER=overlay`. `GPUBAKE_STORAGE_ROOT` moves the store (tests give
each session its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpubake import envs


def cache_root() -> Path:
    """~/.cache/gpubake (or $XDG_CACHE_HOME/gpubake, or $GPUBAKE_CACHE)."""
    if envs.GPUBAKE_CACHE is not None:
        return envs.GPUBAKE_CACHE
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


DRIVERS = envs.declared("GPUBAKE_STORAGE_DRIVER").choices  # vfs, overlay


def default_driver() -> str:
    """`GPUBAKE_STORAGE_DRIVER` (vfs | overlay), vfs by default.

    vfs works in any sandbox (no kernel overlay mount needed) and is what CI builds with;
    it stores every layer as a full copy of the tree (~1.9 GB per layer above the demo's
    Python env). overlay stores diffs where the kernel allows it. Digests are reproducible
    with either driver, each against itself.
    """
    return envs.GPUBAKE_STORAGE_DRIVER  # one of DRIVERS, else a one-line error naming the variable


def storage_at(base: Path, driver: str | None = None) -> Storage:
    """The store under `base` for `driver` (one sub-folder per driver: they cannot share)."""
    driver = driver or default_driver()
    return Storage(root=base / driver / "storage", runroot=base / driver / "run", driver=driver)


def default_storage() -> Storage:
    """The store in $GPUBAKE_STORAGE_ROOT, else ~/.cache/gpubake/containers."""
    return storage_at(envs.GPUBAKE_STORAGE_ROOT or cache_root() / "containers")
