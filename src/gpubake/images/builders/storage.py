"""Where buildah and skopeo keep images: a gpubake-owned containers-storage.

Why our own store: the host's default store may be set up with another driver, and tests
must not collide with a user's images. The driver is overlay where the kernel mounts
overlayfs for us, else vfs (works in any sandbox, at one full copy of the tree per layer);
`GPUBAKE_STORAGE_DRIVER` forces either. `GPUBAKE_STORAGE_ROOT` moves the store (tests give
each session its own).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
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


DRIVERS = tuple(d for d in envs.declared("GPUBAKE_STORAGE_DRIVER").choices if d != "auto")  # overlay, vfs


def default_driver(base: Path | None = None) -> str:
    """`GPUBAKE_STORAGE_DRIVER`, resolved: `auto` (the default) is overlay where it works.

    Why not vfs everywhere: vfs stores every layer as a full copy of the tree, ~1.9 GB a
    layer above the demo's Python env, so the demo's twelve layers take ~16 GB a store and
    a GPU image far more (a CI disk ran out on it). overlay stores diffs. It needs the
    kernel to mount overlayfs for this process, which root can where the sandbox allows
    it; rootless buildah would need fuse-overlayfs or a user namespace, so non-root stays
    on vfs unless told. Digests are reproducible with either driver, each against itself.
    """
    driver = envs.GPUBAKE_STORAGE_DRIVER  # one of the choices, else a one-line error naming the variable
    if driver != "auto":
        return driver
    return "overlay" if _overlay_mounts(_existing_ancestor(base or Path(tempfile.gettempdir()))) else "vfs"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.is_dir():
        path = path.parent
    return path


@functools.lru_cache(maxsize=None)
def _overlay_mounts(where: Path) -> bool:
    """Whether a kernel overlay mount works with its upper dir on `where`'s filesystem.

    The probe mounts a throw-away overlay in a temp dir beside the store and removes it:
    the filesystem under the store is what overlay must accept (not NFS, not overlay
    itself without index support), so the probe asks there rather than in /tmp.
    """
    if os.geteuid() != 0 or shutil.which("mount") is None or shutil.which("umount") is None:
        return False
    try:
        probe = Path(tempfile.mkdtemp(prefix=".gpubake-overlay-probe-", dir=where))
    except OSError:
        return False
    try:
        dirs = {name: probe / name for name in ("lower", "upper", "work", "merged")}
        for path in dirs.values():
            path.mkdir()
        (dirs["lower"] / "probe").write_text("overlay\n")
        options = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        try:
            mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"])],
                                     capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if mounted.returncode != 0:
            return False
        works = (dirs["merged"] / "probe").is_file()
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True, timeout=20)
        return works
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def storage_at(base: Path, driver: str | None = None) -> Storage:
    """The store under `base` for `driver` (one sub-folder per driver: they cannot share)."""
    driver = driver or default_driver(base)
    return Storage(root=base / driver / "storage", runroot=base / driver / "run", driver=driver)


def default_storage() -> Storage:
    """The store in $GPUBAKE_STORAGE_ROOT, else ~/.cache/gpubake/containers."""
    return storage_at(envs.GPUBAKE_STORAGE_ROOT or cache_root() / "containers")
