"""Read a checkpoint's files into the page cache ahead of the loader, several at a time.

Why: at boot the weights come from disk (a new instance, a network volume), and the loader
reads them one tensor at a time through safetensors' mmap, so the disk sees small,
sequential page faults: 28.6 GB took 32 s on an H200 host with the page cache dropped
(docs/benchmarks.md). Started when the self-test starts, a few threads reading whole files
in large chunks keep the disk busy while Python imports, the GPU and kernel checks and the
sampled hashing run, and the loader then finds the files in memory.

Only what fits is read: the files in the loader's order (the experts, then the text
encoder, the VAE, the rest) up to a share of MemAvailable, hard links read once. Reading
more than memory holds would evict what was read first and read it twice. Only the
manifest's files are read (the trust rule: a file it does not list is never opened).

Off by default (`GPUBAKE_PREFETCH=on` turns it on): measured on an H200 host's local disk
it read the 20 GB in 13-14 s, but the boot was no shorter (67.7 s against 66.2 s without
it, same run): the load took ~30 s with every file already in memory, so the loader, not
the disk, bounds it, and the reads slowed the kernel check beside them. Where the disk is
the bound (a network volume), the reads overlap the ~12 s of checks before the load.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake import envs

CHUNK_BYTES = 16 << 20  # large reads: the disk's queue stays deep, the copy stays cheap
THREADS = 4
MEMORY_SHARE = 0.75  # of MemAvailable: the loader's host copies need the rest
_ORDER = ("transformer", "transformer_2", "text_encoder", "vae")  # the loader's order


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, None where the kernel does not say (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def plan(model_dir: Path, rel_paths: Iterable[str], budget: int | None) -> list[Path]:
    """The files to read, in the loader's order, each inode once, within `budget` bytes.

    A path that leaves `model_dir` or is a symlink is left out (the trust guard refuses it
    before loading; prefetching must not read it first).
    """
    root = model_dir.resolve()

    def rank(rel: str) -> tuple[int, str]:
        top = rel.split("/", 1)[0]
        return (_ORDER.index(top) if top in _ORDER else len(_ORDER), rel)

    chosen: list[Path] = []
    seen: set[tuple[int, int]] = set()
    total = 0
    for rel in sorted(rel_paths, key=rank):
        path = model_dir / rel
        try:
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            st = path.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        if budget is not None and total + st.st_size > budget:
            break
        seen.add((st.st_dev, st.st_ino))
        chosen.append(path)
        total += st.st_size
    return chosen


@dataclass
class Prefetch:
    """Background reads of `files`; `summary()` is what the report records."""

    files: list[Path]
    threads: int = THREADS
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _workers: list[threading.Thread] = field(default_factory=list, repr=False)

    def start(self) -> "Prefetch":
        self.started = time.perf_counter()
        queue = list(reversed(self.files))  # pop() takes them in order
        remaining = [min(self.threads, len(queue))]

        def work() -> None:
            buf = bytearray(CHUNK_BYTES)
            view = memoryview(buf)
            while True:
                with self._lock:
                    if not queue:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            self.finished = time.perf_counter()
                        return
                    path = queue.pop()
                try:
                    with open(path, "rb", buffering=0) as fh:
                        while n := fh.readinto(view):
                            with self._lock:
                                self.bytes_read += n
                except OSError as exc:  # the model stage reports a missing or unreadable file
                    with self._lock:
                        self.errors.append(f"{path.name}: {exc.strerror or exc}")

        if not queue:
            self.finished = self.started
        for i in range(remaining[0]):
            worker = threading.Thread(target=work, name=f"gpubake-prefetch-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Whether every file was read (within `timeout` seconds)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.perf_counter()))
        return self.finished is not None

    def summary(self) -> dict[str, Any]:
        with self._lock:
            done = self.finished
            return {
                "files": len(self.files),
                "bytes_read": self.bytes_read,
                "seconds": round((done or time.perf_counter()) - self.started, 3) if self.started else None,
                "finished": done is not None,
                "errors": list(self.errors),
            }


_STARTED: dict[Path, Prefetch] = {}  # one read-ahead a checkpoint a process: the pool's workers share it
_STARTED_LOCK = threading.Lock()


def start_for_checkpoint(model_dir: Path, rel_paths: Iterable[str] | None = None) -> Prefetch | None:
    """Start reading a checkpoint's files in the background (once a process: a second call
    for the same directory gets the first one's); None when turned off or nothing to read.

    `rel_paths` default: the files its manifest lists (none without a readable manifest:
    that is the model check's to report, not this one's)."""
    if envs.GPUBAKE_PREFETCH == "off":
        return None
    key = model_dir.resolve()
    with _STARTED_LOCK:
        if key in _STARTED:
            return _STARTED[key]
        if rel_paths is None:
            from gpubake.provisioning.manifest import ManifestError, read_manifest

            try:
                rel_paths = read_manifest(model_dir)["files"]
            except (ManifestError, OSError, ValueError):
                return None
        available = mem_available()
        files = plan(model_dir, rel_paths, None if available is None else int(available * MEMORY_SHARE))
        if not files:
            return None
        _STARTED[key] = job = Prefetch(files, threads=min(THREADS, os.cpu_count() or 1)).start()
        return job
