"""Shared pieces of every fetch backend: the remote-file record and the resumable writer.

A backend (HTTP, S3) only knows how to open a byte stream of one remote file starting
at an offset; everything about .partial files, resume and verification lives in
`fetch.py`, so the backends cannot disagree on what "complete" means.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpubake.errors import FetchError


@dataclass(frozen=True)
class RemoteFile:
    rel: str  # POSIX path relative to the checkpoint root
    size: int | None  # None when the source does not say (single https file, no manifest)


class Interrupted(Exception):
    """The stream broke mid-way: resumable from what was written (not a user error)."""


class Source(Protocol):
    """A place a checkpoint can be fetched from."""

    def describe(self) -> str: ...
    def manifest_bytes(self) -> bytes | None: ...
    def list_files(self) -> list[RemoteFile]: ...
    def open_range(self, rel: str, offset: int) -> tuple[Iterable[bytes], bool]:
        """Chunks of `rel` from `offset`; the bool says whether the offset was honoured."""
        ...


CHUNK = 1 << 16  # small: a broken stream loses at most one chunk of progress


def append_stream(part: Path, chunks: Iterable[bytes], *, truncate: bool, advance: Callable[[int], None]) -> None:
    """Write `chunks` to `part` (append, or from zero when `truncate`), fsync'd.

    A broken stream raises `Interrupted` after flushing what arrived, so the next
    attempt resumes there; a full disk is a one-line FetchError.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(part, "wb" if truncate else "ab") as fh:
            try:
                for chunk in chunks:
                    if chunk:
                        fh.write(chunk)
                        advance(len(chunk))
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise FetchError(f"{part.parent}: no space left writing {part.name.removesuffix('.partial')}") from None
        raise
