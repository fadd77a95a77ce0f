"""`hf://org/repo[@rev]` sources through huggingface_hub.

huggingface_hub already does parallel, resumable downloads; we add what it does not:
download into our staging directory (atomic placement by `fetch`), verification of
every file against the Hub's tree listing (sha256 of LFS files, git blob id of small
files; recorded in the fetch manifest's `hub`, so `quantize` checks against them later)
or against a gpubake manifest when the repo has one, and one-line errors. The token
comes from HF_TOKEN (read by huggingface_hub itself); it is never written anywhere. HF_ENDPOINT is honoured at call
time (huggingface_hub reads it only at import).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gpubake.errors import FetchError
from gpubake.provisioning.manifest import ManifestError, sha256_file


@dataclass(frozen=True)
class HfRef:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hf_uri(uri: str) -> HfRef:
    body = uri.removeprefix("hf://")
    repo, _, rev = body.partition("@")
    parts = repo.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise FetchError(f"{uri}: expected hf://org/repo[@revision]")
    return HfRef("/".join(parts), rev or None)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _error(ref: HfRef, exc: BaseException) -> FetchError:
    name = exc.__class__.__name__
    if name == "GatedRepoError":
        return FetchError(f"{ref}: gated repository (accept its license and set HF_TOKEN)")
    if name == "RepositoryNotFoundError":
        return FetchError(f"{ref}: repository not found, or HF_TOKEN lacks access")
    if name == "RevisionNotFoundError":
        return FetchError(f"{ref}: revision not found")
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(exc, (ConnectionError, OSError)):
        return FetchError(f"{ref}: Hugging Face endpoint {_endpoint() or 'https://huggingface.co'} unreachable")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return FetchError(f"{ref}: HTTP {status} (missing or wrong HF_TOKEN)")
    return FetchError(f"{ref}: {name}: {' '.join(str(exc).split())[:200]}")


def hub_hashes(ref: HfRef, allow: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """{path: (kind, hex)} for every file of the repo (matching `allow`'s globs, as
    `download` selects them), from the Hub's tree listing: ("sha256", ...) for LFS
    files, ("git-sha1", blob id) for small files in git."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    try:
        entries = list(HfApi(endpoint=_endpoint()).list_repo_tree(ref.repo_id, revision=ref.revision, recursive=True))
    except Exception as exc:  # huggingface_hub raises many types; all are one line for us
        raise _error(ref, exc) from None
    out: dict[str, tuple[str, str]] = {}
    for e in entries:
        if not hasattr(e, "blob_id"):
            continue  # a folder
        lfs = getattr(e, "lfs", None)
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        out[e.path] = ("sha256", sha) if sha else ("git-sha1", e.blob_id)
    if allow is not None:
        out = {p: out[p] for p in filter_repo_objects(list(out), allow_patterns=allow)}
    return out


def hub_record(ref: HfRef, hashes: dict[str, tuple[str, str]]) -> dict[str, object]:
    """What the fetch manifest keeps of the Hub's listing (`hub`): the repo, revision and
    every file's published hash (`sha256` of LFS files, `git_blob_sha1` of the others)."""
    key = {"sha256": "sha256", "git-sha1": "git_blob_sha1"}
    files = {rel: {key[kind]: digest} for rel, (kind, digest) in sorted(hashes.items())}
    return {"repo": ref.repo_id, "revision": ref.revision, "files": files}


def download(ref: HfRef, staging: Path, *, jobs: int, allow: list[str] | None = None) -> None:
    """snapshot_download into `staging` (resumes what a previous run left there); `allow`:
    only the files matching these globs."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            local_dir=staging,
            max_workers=jobs,
            endpoint=_endpoint(),
            allow_patterns=allow,
        )
    except Exception as exc:
        raise _error(ref, exc) from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # hub bookkeeping, not checkpoint


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_against_hub(staging: Path, hashes: dict[str, tuple[str, str]]) -> int:
    """Check every file against the Hub's hash (sha256 for LFS files, the git blob id
    otherwise); a mismatching file is deleted. Returns how many were checked."""
    for rel, (kind, digest) in hashes.items():
        path = staging / rel
        if not path.is_file():
            raise ManifestError(f"{rel}: listed by the Hub but not downloaded")
        got = sha256_file(path) if kind == "sha256" else _git_blob_sha1(path)
        if got != digest:
            path.unlink()
            raise ManifestError(f"{rel}: {kind.replace('git-sha1', 'git blob sha1')} mismatch (got {got[:16]}…, Hub says {digest[:16]}…)")
    return len(hashes)
