"""`gpubake-manifest.json`: the sha256 and size of every file of a checkpoint.

Every checkpoint gpubake writes (make-tiny, quantize, fetch) carries one; `fetch`,
`quantize` (its source), the loader and the self-test verify against it, and it is the
whole truth: a file it does not list is never read (`provisioning.trust`). The manifest holds no timestamps, so identical
checkpoints have byte-identical manifests (the demo image's reproducibility relies on it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gpubake import __version__
from gpubake.errors import GpubakeError
from gpubake.fsutil import sha256_file, write_json_atomic

MANIFEST_NAME = "gpubake-manifest.json"
SCHEMA_VERSION = 1


class ManifestError(GpubakeError):
    """A manifest is missing, malformed, or a file does not match it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `root`, sorted, the top-level
    manifest excluded (a nested file of that name is content like any other)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and not p.name.endswith(".partial"):
            out.append(rel)
    return out


def hash_tree(root: Path, jobs: int | None = None) -> dict[str, dict[str, Any]]:
    """{relpath: {"sha256", "size"}} for every file under `root`.

    Files are hashed in parallel threads (hashlib releases the GIL on large buffers):
    a 12-shard expert hashes at several GB/s instead of one core's ~0.6 GB/s.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    rels = list_files(root)
    workers = max(1, min(jobs or (os.cpu_count() or 1), 8, len(rels) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda rel: sha256_file(root / rel), rels))
    return {rel: {"sha256": d, "size": (root / rel).stat().st_size} for rel, d in zip(rels, digests)}


def build_manifest(root: Path, *, fmt: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A manifest for the checkpoint in `root` (hashes computed now)."""
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "gpubake",
        "tool_version": __version__,
        "format": fmt,
        "model_id": model_id,
        "files": hash_tree(root),
    }
    manifest.update(extra)
    return manifest


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, whether raised as OSError or wrapped by a writer (safetensors'
    Rust serializer reports "No space left on device (os error 28)")."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "os error 28" in text or "No space left on device" in text


def normalise_modes(root: Path) -> None:
    """0644 files, 0755 dirs: writers differ (mkstemp is 0600) and image users other
    than root must read the weights."""
    import os

    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(root, 0o755)


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def parse_manifest(text: str | bytes, *, origin: str) -> dict[str, Any]:
    """Parse and shape-check a manifest; `origin` names it in errors."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{origin}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ManifestError(f"{origin}: not a gpubake manifest (no 'files' object)")
    for rel, entry in data["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or not isinstance(entry.get("size"), int)
        ):
            raise ManifestError(f"{origin}: files[{rel!r}] needs 'sha256' (64 hex) and 'size' (int)")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ManifestError(f"{origin}: files[{rel!r}] escapes the checkpoint directory")
    return data


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing (not a gpubake checkpoint)")
    return parse_manifest(path.read_bytes(), origin=str(path))


def verify_file(path: Path, entry: dict[str, Any], rel: str) -> None:
    """Raise if `path` does not have the manifest's size and sha256."""
    size = path.stat().st_size
    if size != entry["size"]:
        raise ManifestError(f"{rel}: size {size} != manifest size {entry['size']}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ManifestError(f"{rel}: sha256 mismatch (got {digest[:16]}…, manifest {entry['sha256'][:16]}…)")


def verify_tree(root: Path, manifest: dict[str, Any] | None = None, *, allow_extra: bool = False) -> None:
    """Check every file listed in the manifest; extra files are an error unless allowed."""
    manifest = manifest if manifest is not None else read_manifest(root)
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise ManifestError(f"{rel}: listed in the manifest but missing from {root}")
        verify_file(path, entry, rel)
    if not allow_extra:
        extra = sorted(set(list_files(root)) - set(manifest["files"]))
        if extra:
            raise ManifestError(f"{extra[0]}: present in {root} but not in the manifest")
