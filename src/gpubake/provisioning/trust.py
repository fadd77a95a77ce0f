"""The manifest is the whole truth: what of a checkpoint may be read, and whether a
quantize source is what its producer hashed (issue 13).

Two holes this closes: a file the manifest does not list (an injected
`*.safetensors.index.json` and the shard it names) was loaded and passed the model
check, and `quantize` re-hashed whatever its source held, so a corrupt or tampered
source came out with a fresh, valid-looking manifest.

Rules, shared by quantize, the loader and the self-test's model check:
- a checkpoint may hold only the files its `gpubake-manifest.json` lists, plus
  `ALLOWED_UNLISTED` (the manifest itself, at the top);
- no symlink may lead outside the checkpoint directory (nor may a listed path), and
  only regular files are read (a FIFO would hang a hasher);
- a quantize source is verified against its own manifest (written by `fetch`, which
  checked every file against its origin and, for hf://, records the Hub's sha256 of
  every LFS file, or by `make-tiny`, the producer) unless the caller trusts it.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.manifest import MANIFEST_NAME, ManifestError, read_manifest, sha256_file

# Files a checkpoint may hold without the manifest listing them (relative POSIX paths).
ALLOWED_UNLISTED = frozenset({MANIFEST_NAME})
# huggingface_hub's bookkeeping in a `--local-dir` download: not checkpoint content.
# Skipped (neither hashed nor copied) only when a source is trusted without a manifest.
HF_BOOKKEEPING = ".cache/huggingface/"


class TrustError(CheckpointError):
    """A checkpoint holds a file its manifest does not vouch for, or a symlink out of it."""


@dataclass
class Scan:
    """What is under a directory, without reading any file's content."""

    files: list[str] = field(default_factory=list)  # regular files (or links to one inside root)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why it may not be read)


def scan(root: Path) -> Scan:
    """Every entry under `root` (not following symlinks): regular files, and a problem
    for each symlink leading outside `root` and each entry that is not a regular file."""
    out = Scan()
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                try:
                    target = p.resolve()
                except (OSError, RuntimeError):
                    out.problems.append((rel, "symlink loop"))
                    continue
                if not target.is_relative_to(real_root):
                    out.problems.append((rel, f"symlink to {os.readlink(p)} leads outside {root}"))
                elif target.is_file():
                    out.files.append(rel)
                elif not target.is_dir():  # a link to a directory inside root: its files are seen where they are
                    out.problems.append((rel, "symlink to nothing readable"))
                continue
            if name in dirnames:
                continue
            if not stat.S_ISREG(p.lstat().st_mode):
                out.problems.append((rel, "not a regular file"))
            else:
                out.files.append(rel)
    out.files.sort()
    return out


def unlisted(files: list[str], listed: dict[str, Any]) -> list[str]:
    """The files the manifest does not list, allow-list aside."""
    return sorted(f for f in files if f not in listed and f not in ALLOWED_UNLISTED)


def contained(root: Path, rel: str) -> bool:
    """Whether `root/rel`, symlinks resolved, stays inside `root`."""
    try:
        return (root / rel).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def _first(root: Path, items: list[str], why: str) -> str:
    more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
    return f"{root / items[0]}: {why}{more}"


def refuse_escapes(root: Path, found: Scan | None = None) -> Scan:
    """Raise TrustError naming the first symlink out of `root` or non-regular file."""
    found = found or scan(root)
    if found.problems:
        rel, why = found.problems[0]
        raise TrustError(f"{root / rel}: {why}")
    return found


def guard_checkpoint(root: Path, *, require_manifest: bool = False) -> dict[str, Any] | None:
    """The loader's rule: raise TrustError naming the first file it must not read.

    With a manifest, every file under `root` must be listed (an unlisted weight file or
    index is never opened: the load fails instead). Without one, only symlinks out are
    refused, unless `require_manifest` (the serving path) refuses the directory.
    Returns the manifest, or None.
    """
    found = refuse_escapes(root)
    if not (root / MANIFEST_NAME).is_file():
        if require_manifest:
            raise TrustError(f"{root / MANIFEST_NAME}: missing; only a checkpoint with a manifest is served")
        return None
    manifest = read_manifest(root)
    extra = unlisted(found.files, manifest["files"])
    if extra:
        raise TrustError(_first(root, extra, f"not in {MANIFEST_NAME}; a checkpoint is loaded only when the manifest lists every file"))
    return manifest


def _hash_all(root: Path, rels: list[str]) -> dict[str, str]:
    """{rel: sha256} on a few threads (hashlib releases the GIL: disk-bound)."""
    workers = max(1, min(os.cpu_count() or 1, 8, len(rels) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(rels, pool.map(lambda rel: sha256_file(root / rel), rels)))


def _check_hub(src: Path, manifest: dict[str, Any]) -> None:
    """A fetch from hf:// records the Hub's hashes; the files' sha256 must agree with
    every LFS sha256 the Hub published (the Hub is the origin's truth)."""
    hub = manifest.get("hub")
    if hub is None:
        return
    files = hub.get("files") if isinstance(hub, dict) else None
    if not isinstance(files, dict):
        raise ManifestError(f"{src / MANIFEST_NAME}: 'hub' needs a 'files' object")
    for rel, entry in sorted(files.items()):
        hub_sha = entry.get("sha256") if isinstance(entry, dict) else None
        if hub_sha is None:
            continue  # a small git file: its blob id was checked at fetch; no sha256 to compare
        listed = manifest["files"].get(rel)
        if listed is None or listed["sha256"] != hub_sha:
            raise TrustError(f"{src / rel}: the manifest's sha256 is not the Hub's LFS sha256 recorded at fetch")


def check_listing(src: Path, *, trust_source: bool = False) -> Scan:
    """The cheap half of `verify_source` (no content read): no symlink out of `src`, and,
    unless trusted, no file its manifest does not list. Run before anything parses the
    source, so an injected file is named as such rather than by what it breaks."""
    found = refuse_escapes(src)
    if not trust_source and (src / MANIFEST_NAME).is_file():
        extra = unlisted(found.files, read_manifest(src)["files"])
        if extra:
            raise TrustError(_first(src, extra, f"not in the source's {MANIFEST_NAME}"))
    return found


def verify_source(src: Path, *, trust_source: bool = False) -> dict[str, Any]:
    """Check a quantize source against its own manifest; return the record the output
    manifest keeps as `source` (`verified`, `manifest_sha256`, `origin`, `files`).

    Raises (one line naming the file) on a symlink out of `src`, a file the manifest
    does not list, a missing file, or a size or sha256 that differs. `trust_source`
    hashes the files as they are instead (symlinks out are refused all the same).
    """
    found = check_listing(src, trust_source=trust_source)
    mpath = src / MANIFEST_NAME
    manifest = read_manifest(src) if mpath.is_file() else None
    manifest_sha = sha256_file(mpath) if manifest is not None else None
    if trust_source:
        rels = [f for f in found.files if f not in ALLOWED_UNLISTED and not f.startswith(HF_BOOKKEEPING)]
        digests = _hash_all(src, rels)
        files = {rel: {"sha256": digests[rel], "size": (src / rel).stat().st_size} for rel in rels}
        return {"verified": "trusted", "manifest_sha256": manifest_sha, "files": files}
    if manifest is None:
        raise TrustError(
            f"{src}: no {MANIFEST_NAME} to verify the source against; get it with `gpubake fetch` "
            "(which records every file's sha256) or pass --trust-source"
        )
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for rel, entry in sorted(listed.items()):  # cheap checks before hashing tens of GB
        path = src / rel
        if not contained(src, rel) or not path.is_file():
            raise ManifestError(f"{path}: listed in the source's {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ManifestError(f"{path}: size {size} != source manifest size {entry['size']}")
    _check_hub(src, manifest)
    digests = _hash_all(src, sorted(listed))
    for rel, got in digests.items():
        if got != listed[rel]["sha256"]:
            raise ManifestError(
                f"{src / rel}: sha256 {got[:16]}… != source manifest {listed[rel]['sha256'][:16]}…; "
                "the source is corrupt or changed since it was written (or pass --trust-source)"
            )
    origin = {k: manifest[k] for k in ("source", "verified") if isinstance(manifest.get(k), str)}
    return {"verified": "manifest", "manifest_sha256": manifest_sha, "origin": origin, "files": listed}


def check_copies(out_files: dict[str, Any], source_files: dict[str, Any], copied: list[str]) -> None:
    """Files copied byte for byte must hash in the output as they verified in the
    source (a file swapped between verification and copy is caught here)."""
    for rel in copied:
        if out_files[rel]["sha256"] != source_files[rel]["sha256"]:
            raise TrustError(f"{rel}: changed in the source while it was being copied")
