"""Stage 3's work: do the baked model files match their manifest?

Sizes are always checked (a stat per file: cheap, catches truncated layers). Hashes:
every file in full, or with `quick` only the small files plus a random sample of the
large ones (each boot samples different shards, so a corrupt one is found eventually
without a full read of tens of GB on every boot). Hashing runs on a few threads:
hashlib releases the GIL, so this is bound by the disk, not the interpreter.

The manifest is the whole truth (`provisioning.trust`): a file it does not list (only
the manifest itself is allowed), a symlink leading out of the model directory or
anything but a regular file fails the check, since the loader would refuse it anyway.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL_FILE = 64 << 20  # files at most this big are always hashed, even with --quick
QUICK_SAMPLE = 0.25  # fraction of the large files hashed with --quick (at least one)


@dataclass
class ModelCheck:
    """Outcome of a model-files check. `problems` empty means the files are good."""

    files: int = 0
    total_bytes: int = 0
    hashed: list[str] = field(default_factory=list)
    hashed_bytes: int = 0
    extra_files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    model_id: str | None = None
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "total_bytes": self.total_bytes,
            "hashed_files": len(self.hashed),
            "hashed_bytes": self.hashed_bytes,
            "extra_files": self.extra_files[:20],
            "problems": self.problems[:20],
            "model_id": self.model_id,
            "format": self.format,
        }


def check_model_dir(root: Path, *, quick: bool = False, rng: random.Random | None = None) -> ModelCheck:
    """Check `root` against its gpubake-manifest.json; never raises for bad files."""
    from gpubake.provisioning import trust
    from gpubake.provisioning.manifest import ManifestError, read_manifest, sha256_file

    out = ModelCheck()
    if not root.is_dir():
        out.problems.append(f"{root}: model directory missing")
        return out
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:
        out.problems.append(str(exc))
        return out
    out.model_id = manifest.get("model_id")
    out.format = manifest.get("format")
    entries: dict[str, dict[str, Any]] = manifest["files"]
    out.files = len(entries)
    to_hash: list[str] = []
    large: list[str] = []
    found = trust.scan(root)
    bad = {rel for rel, _ in found.problems}
    out.problems += [f"{rel}: {why}" for rel, why in found.problems]
    for rel, entry in sorted(entries.items()):
        path = root / rel
        out.total_bytes += entry["size"]
        if rel in bad:
            continue  # already a problem above; never read through a link out
        if not trust.contained(root, rel):
            out.problems.append(f"{rel}: leads outside the model directory")
            continue
        if not path.is_file():
            out.problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            out.problems.append(f"{rel}: size {size} != manifest {entry['size']}")
            continue
        (large if quick and size > SMALL_FILE else to_hash).append(rel)
    if large:
        rng = rng or random.Random()
        to_hash += rng.sample(large, max(1, round(len(large) * QUICK_SAMPLE)))

    workers = min(4, os.cpu_count() or 1, max(1, len(to_hash)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(to_hash, pool.map(lambda rel: sha256_file(root / rel), to_hash)))
    for rel in to_hash:
        out.hashed.append(rel)
        out.hashed_bytes += entries[rel]["size"]
        if digests[rel] != entries[rel]["sha256"]:
            out.problems.append(f"{rel}: sha256 mismatch")
    out.extra_files = trust.unlisted(found.files, entries)
    out.problems += [f"{rel}: not in the manifest" for rel in out.extra_files]
    return out
