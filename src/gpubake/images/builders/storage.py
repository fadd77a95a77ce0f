"""Where buildah and skopeo keep images: a gpubake-owned containers-storage.

Why our own store: the host's default store may be set up with another driver, and tests
must not collide with a user's images. The driver is overlay where the kernel allows
overlay mounts (fast, diffs only) and vfs elsewhere (works everywhere, full copies);
`GPUBAKE_STORAGE_DRIVER` forces one. `GPUBAKE_STORAGE_ROOT` moves the store (tests give
each session its own).
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
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


DRIVERS = ("overlay", "vfs")


def _overlay_works() -> bool:
    """Whether this kernel lets us mount overlayfs (root, not inside a restrictive sandbox)."""
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory(prefix="gpubake-ovl.") as tmp:
        dirs = {name: Path(tmp) / name for name in ("lower", "upper", "work", "merged")}
        for d in dirs.values():
            d.mkdir()
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        try:
            mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])], capture_output=True)
        except OSError:
            return False
        if mounted.returncode != 0:
            return False
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True)
        return True


@functools.lru_cache(maxsize=1)
def default_driver() -> str:
    """`GPUBAKE_STORAGE_DRIVER` (overlay | vfs), else overlay where the kernel allows it, else vfs.

    vfs stores every layer as a full copy of the tree (~2 GB per layer above the demo's
    Python env: minutes of copying and tens of GB per store); overlay stores diffs.
    Digests are reproducible with either, each with itself.
    """
    wanted = os.environ.get("GPUBAKE_STORAGE_DRIVER", "").strip()
    if wanted:
        if wanted not in DRIVERS:
            from gpubake.errors import BuildError

            raise BuildError(f"GPUBAKE_STORAGE_DRIVER: {wanted!r} is not one of {', '.join(DRIVERS)}")
        return wanted
    return "overlay" if _overlay_works() else "vfs"


def storage_at(base: Path, driver: str | None = None) -> Storage:
    """The store under `base` for `driver` (one sub-folder per driver: they cannot share)."""
    driver = driver or default_driver()
    return Storage(root=base / driver / "storage", runroot=base / driver / "run", driver=driver)


def default_storage() -> Storage:
    """The store in $GPUBAKE_STORAGE_ROOT, else ~/.cache/gpubake/containers."""
    return storage_at(Path(os.environ.get("GPUBAKE_STORAGE_ROOT") or cache_root() / "containers"))
