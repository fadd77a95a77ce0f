"""User-facing errors.

Every failure a user can cause (bad flag, bad spec field, unreachable source, wrong
password) is raised as a `GpubakeError` whose message is ONE line naming the file,
field or flag at fault. The CLI prints it as `error: <message>` and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GpubakeError(Exception):
    """An error caused by input or environment, reported as one line."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        one_line = " ".join(str(message).split())
        super().__init__(one_line)
        if exit_code is not None:
            self.exit_code = exit_code


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a report or a job's error: its type and its message,
    whitespace collapsed, cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


class SpecError(GpubakeError):
    """An image spec file is missing, malformed, or asks for something impossible."""


class BuildError(GpubakeError):
    """A builder (buildah, docker, packer) failed or is not installed."""


class RegistryError(GpubakeError):
    """A registry refused a push or a pull (auth, network, manifest)."""


class FetchError(GpubakeError):
    """A checkpoint source could not be fetched or did not verify."""


class KernelError(GpubakeError):
    """Bad tensor input for an NVFP4 kernel, or a backend this device cannot run."""
