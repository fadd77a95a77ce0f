"""`gpubake fetch SOURCE DEST`: get a checkpoint from hf://, s3:// or https://, verified.

Placement is atomic at two levels:
- each file is written as `<name>.partial` and renamed only after its size and sha256
  match the manifest, so no file ever looks complete when it is not;
- the whole checkpoint is assembled in a staging directory `.<DEST>.partial` beside
  DEST and renamed onto DEST only when every file verified. DEST either does not
  exist or is complete.

An interrupted run leaves the staging directory; the next run resumes every `.partial`
with a Range request from where it stopped. A corrupt file (sha256 mismatch) is
deleted, never resumed. A full disk deletes the staging directory (the space is
needed back) and fails with one line.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpubake.errors import FetchError
from gpubake.provisioning.manifest import (
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    parse_manifest,
    sha256_bytes,
    verify_file,
    verify_tree,
    write_manifest,
)
from gpubake.provisioning.transfer import Interrupted, RemoteFile, Source, append_stream

MAX_RESUMES = 5  # stream breaks survived per file within one run


def staging_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.partial"


def open_source(source: str, *, endpoint_url: str | None = None) -> Source:
    """The backend for a source URI (hf:// is handled separately: huggingface_hub)."""
    if source.startswith("s3://"):
        from gpubake.provisioning.s3 import S3Source

        return S3Source(source, endpoint_url=endpoint_url)
    if source.startswith(("https://", "http://")):
        from gpubake.provisioning.http_fetch import HttpSource

        return HttpSource(source)
    raise FetchError(f"{source}: unsupported source (use hf://org/repo[@rev], s3://bucket/prefix or https://...)")


def fetch(
    source: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    endpoint_url: str | None = None,
    jobs: int = 4,
    dry_run: bool = False,
    progress: bool = True,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """Fetch `source` into `dest`; returns a summary (files, bytes, how it was verified).

    `sha256`, when given, is the expected sha256 of the source's gpubake manifest (what
    an image spec pins); every file is then checked against that manifest. `files`
    (hf:// only) fetches just the repo files matching those globs (huggingface_hub's
    allow_patterns), each verified against the Hub.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FetchError(f"{dest}: already exists and is not empty (remove it or choose another DEST)")
    started = time.monotonic()
    if source.startswith("hf://"):
        return _fetch_hf(source, dest, sha256=sha256, jobs=jobs, dry_run=dry_run, started=started, files=files)
    if files is not None:
        raise FetchError(f"{source}: a file selection is for hf:// sources only")

    src = open_source(source, endpoint_url=endpoint_url)
    raw = src.manifest_bytes()
    manifest = None
    if raw is not None:
        if sha256 and sha256_bytes(raw) != sha256.lower():
            raise FetchError(f"{src.describe()}: manifest sha256 {sha256_bytes(raw)[:16]}… != expected {sha256[:16]}…")
        manifest = parse_manifest(raw, origin=f"{src.describe()} {MANIFEST_NAME}")
    elif sha256 and not _single_file(src):
        raise FetchError(f"{src.describe()}: --sha256 given but the source has no {MANIFEST_NAME}")
    files = src.list_files()
    total = sum(f.size or 0 for f in files)
    plan = {"source": src.describe(), "dest": str(dest), "files": len(files), "bytes": total}
    if dry_run:
        return {**plan, "dry_run": True, "paths": [f.rel for f in files]}

    staging = staging_dir(dest)
    staging.mkdir(parents=True, exist_ok=True)
    resumed = _Counter()
    try:
        with _progress(progress, total, src.describe()) as advance:
            def one(f: RemoteFile) -> None:
                entry = manifest["files"][f.rel] if manifest else None
                expect = sha256 if (sha256 and manifest is None) else None
                _fetch_file(src, f, staging, entry, expect, advance, resumed)

            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                for fut in [pool.submit(one, f) for f in files]:
                    fut.result()
        if manifest is not None:
            (staging / MANIFEST_NAME).write_bytes(raw)  # type: ignore[arg-type]
            verify_tree(staging, manifest)
            verified = "manifest"
        else:
            verified = "sha256" if sha256 else "none"
            write_manifest(staging, build_manifest(staging, fmt="unknown", source=src.describe(), verified=verified))
    except ManifestError as exc:
        _drop_if_empty(staging)
        raise FetchError(str(exc)) from None
    except FetchError as exc:
        if "no space left" in str(exc):
            shutil.rmtree(staging, ignore_errors=True)
        _drop_if_empty(staging)
        raise
    _place(staging, dest)
    return {**plan, "verified": verified, "resumed_bytes": resumed.value, "seconds": round(time.monotonic() - started, 3)}


def _single_file(src: Source) -> bool:
    return getattr(src, "single", None) is not None


def _fetch_file(
    src: Source,
    f: RemoteFile,
    staging: Path,
    entry: dict[str, Any] | None,
    expect_sha: str | None,
    advance: Any,
    resumed: _Counter,
) -> None:
    final = staging / f.rel
    if final.is_file():  # finished by an earlier run: trust only after re-verifying
        try:
            if entry:
                verify_file(final, entry, f.rel)
            advance(final.stat().st_size)
            return
        except ManifestError:
            final.unlink()
    part = final.with_name(final.name + ".partial")
    for attempt in range(MAX_RESUMES + 1):
        offset = part.stat().st_size if part.exists() else 0
        if f.size is not None and offset > f.size:
            offset = 0
        if f.size is not None and offset == f.size and offset:
            break
        if offset:
            resumed.add(offset)
        chunks, honoured = src.open_range(f.rel, offset)
        if not honoured:
            offset = 0  # server ignored Range: start this file over
        advance(offset)
        try:
            append_stream(part, chunks, truncate=offset == 0, advance=advance)
            break
        except Interrupted as exc:
            if attempt == MAX_RESUMES:
                have = part.stat().st_size if part.exists() else 0
                raise FetchError(f"{f.rel}: transfer broke {attempt + 1} times, {have} bytes kept; rerun to resume ({exc})") from None
            advance(-(part.stat().st_size if part.exists() else 0))
    try:
        if entry:
            verify_file(part, entry, f.rel)
        elif expect_sha:
            verify_file(part, {"sha256": expect_sha.lower(), "size": part.stat().st_size}, f.rel)
        elif f.size is not None and part.stat().st_size != f.size:
            raise ManifestError(f"{f.rel}: size {part.stat().st_size} != listed size {f.size}")
    except ManifestError:
        part.unlink()  # corrupt bytes are never resumed
        raise
    os.replace(part, final)


def _drop_if_empty(staging: Path) -> None:
    """Remove a staging directory that holds nothing worth resuming."""
    if staging.is_dir() and not any(p.is_file() for p in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)


def _place(staging: Path, dest: Path) -> None:
    """Move the verified staging directory onto DEST (an empty DEST dir is replaced)."""
    if dest.is_dir():
        dest.rmdir()
    os.replace(staging, dest)


def _fetch_hf(source: str, dest: Path, *, sha256: str | None, jobs: int, dry_run: bool, started: float,
              files: list[str] | None = None) -> dict[str, Any]:
    from gpubake.provisioning import hf_fetch

    ref = hf_fetch.parse_hf_uri(source)
    plan = {"source": str(ref), "dest": str(dest)} | ({"select": list(files)} if files is not None else {})
    if dry_run:
        return {**plan, "dry_run": True}
    if files is not None and sha256:
        raise FetchError(f"{ref}: --sha256 pins a whole repository's manifest; it cannot go with a file selection")
    staging = staging_dir(dest)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        hf_fetch.download(ref, staging, jobs=jobs, allow=files)
        if files is None and (staging / MANIFEST_NAME).is_file():
            raw = (staging / MANIFEST_NAME).read_bytes()
            if sha256 and sha256_bytes(raw) != sha256.lower():
                raise FetchError(f"{ref}: manifest sha256 {sha256_bytes(raw)[:16]}… != expected {sha256[:16]}…")
            verify_tree(staging, parse_manifest(raw, origin=f"{ref} {MANIFEST_NAME}"))
            verified = "manifest"
        else:
            if sha256:
                raise FetchError(f"{ref}: --sha256 given but the repository has no {MANIFEST_NAME}")
            hashes = hf_fetch.hub_hashes(ref, allow=files)
            if not hashes:
                raise FetchError(f"{ref}: no file matches {', '.join(files or [])}")
            hf_fetch.verify_against_hub(staging, hashes)
            verified = "hub"
            # The Hub's own hashes go in the manifest: `quantize` checks the files against them.
            write_manifest(staging, build_manifest(staging, fmt="unknown", source=str(ref), verified=verified,
                                                   hub=hf_fetch.hub_record(ref, hashes)))
    except ManifestError as exc:
        _drop_if_empty(staging)
        raise FetchError(str(exc)) from None
    except FetchError:
        _drop_if_empty(staging)
        raise
    files = sum(1 for p in staging.rglob("*") if p.is_file()) - 1
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    _place(staging, dest)
    return {**plan, "files": files, "bytes": size, "verified": verified, "seconds": round(time.monotonic() - started, 3)}


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


class _progress:
    """A rich byte progress bar (stderr), or a no-op; yields a thread-safe advance(n)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._lock = threading.Lock()

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from gpubake.console import transfer_progress

        self._p = transfer_progress()
        self._p.__enter__()
        task = self._p.add_task(f"fetch {self.label}", total=self.total or None)

        def advance(n: int) -> None:
            with self._lock:
                self._p.advance(task, n)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.__exit__(*exc)
