"""What every builder takes and returns, so the CLI never cares which tool built the image.

`BuildRequest` names a rendered build context (see `gpubake.images.render`) and where the
OCI archive goes; `BuildResult` reports the manifest digest and per-layer digests/sizes
that `build-image --json` prints. Builders implement the `Builder` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # the spec module belongs to the front half; avoid an import cycle
    from gpubake.images.spec import ImageSpec


@dataclass
class BuildRequest:
    """One image build: spec + target + the already-rendered context directory."""

    spec: ImageSpec
    target: str
    context_dir: Path  # rendered by images.render (Containerfile, packer HCL, scripts, model/)
    tag: str  # local name, e.g. localhost/gpubake/demo:runpod
    archive: Path | None  # OCI archive to write (dist/<name>-<target>.oci.tar), atomically
    timestamp: int  # SOURCE_DATE_EPOCH for reproducible builds
    log_file: Path  # full build log (progress shows a summary)


@dataclass
class BuildResult:
    """What a finished build produced; `digest` is the image manifest digest (sha256:...)."""

    digest: str
    archive: Path | None
    layers: list[dict] = field(default_factory=list)  # {"digest": "sha256:...", "size": int}
    total_size: int = 0
    builder: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The fields `build-image --json` prints."""
        return {
            "digest": self.digest,
            "archive": str(self.archive) if self.archive else None,
            "layers": self.layers,
            "total_size": self.total_size,
            "builder": self.builder,
            "seconds": round(self.seconds, 3),
        }


@runtime_checkable
class Builder(Protocol):
    """A tool that turns a rendered context into an image (buildah, docker, packer)."""

    name: str

    def available(self) -> bool:
        """True when the tool is installed and usable right now (daemon reachable, ...)."""
        ...

    def build(self, req: BuildRequest) -> BuildResult:
        """Build `req`; raise `BuildError` (one line, log file named) on failure."""
        ...
