"""The model check of a service started without the self-test (`serve --no-selftest`).

Every start stats every file of the manifest (sizes: cheap, catches a truncated or
missing shard). Full sha256 hashes are computed once per file and remembered with the
file's size and mtime in `model-hashes.json` in the data directory, so a restart re-hashes
only files that changed since: tens of GB are read once, not on every boot. A corrupt
file that kept its size and mtime is not found again after its first good hash; the
self-test (`--selftest`, the default) hashes afresh every boot.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CACHE_NAME = "model-hashes.json"


@dataclass
class ModelVerify:
    files: int = 0
    hashed_files: int = 0
    cached_files: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = self.problems[:20]
        return d


def _load_cache(path: Path, key: dict[str, str]) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def verify_model_dir(root: Path, cache_path: Path) -> ModelVerify:
    """Check `root` against its manifest (see module docstring); never raises for bad files."""
    from gpubake.fsutil import sha256_file, write_json_atomic
    from gpubake.provisioning.manifest import MANIFEST_NAME, ManifestError, read_manifest, sha256_bytes

    out = ModelVerify()
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:
        out.problems.append(str(exc))
        return out
    entries: dict[str, dict[str, Any]] = manifest["files"]
    out.files = len(entries)
    # a replaced manifest or another model directory invalidates every remembered hash
    key = {"model_dir": str(root.resolve()), "manifest_sha256": sha256_bytes((root / MANIFEST_NAME).read_bytes())}
    cache = _load_cache(cache_path, key)
    stats: dict[str, os.stat_result] = {}
    to_hash: list[str] = []
    for rel, entry in sorted(entries.items()):
        try:
            st = (root / rel).stat()
        except OSError:
            out.problems.append(f"{rel}: missing from {root}")
            continue
        if st.st_size != entry["size"]:
            out.problems.append(f"{rel}: size {st.st_size} != manifest size {entry['size']}")
            continue
        stats[rel] = st
        seen = cache.get(rel) or {}
        if seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns and seen.get("sha256") == entry["sha256"]:
            out.cached_files += 1
        else:
            to_hash.append(rel)
    workers = min(4, os.cpu_count() or 1, max(1, len(to_hash)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(to_hash, pool.map(lambda rel: sha256_file(root / rel), to_hash)))
    good = {rel: cache[rel] for rel in stats if rel not in digests and rel in cache}
    for rel, digest in digests.items():
        out.hashed_files += 1
        if digest != entries[rel]["sha256"]:
            out.problems.append(f"{rel}: sha256 mismatch (got {digest[:16]}…, manifest {entries[rel]['sha256'][:16]}…)")
        else:
            good[rel] = {"size": stats[rel].st_size, "mtime_ns": stats[rel].st_mtime_ns, "sha256": digest}
    try:
        write_json_atomic(cache_path, {"key": key, "files": good})
    except OSError:
        pass  # a full or read-only data dir costs a re-hash next boot, not the boot itself
    return out
