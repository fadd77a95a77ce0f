"""What every builder takes, plans and returns, so the CLI never cares which tool built the image.

`BuildRequest` names a rendered build context (see `gpubake.images.render`) and where the
OCI archive goes; `BuildResult` reports the manifest digest and per-layer digests/sizes
that `build-image --json` prints. A builder's `plan(req)` is the list of `Step`s (the
commands) its `build(req, on_progress)` runs, in order: `build-image --dry-run` prints that
list, so what a dry run shows is what a build does. Builders implement `Builder`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gpubake.secrets import SECRET_ENV_VARS, is_secret_name

if TYPE_CHECKING:  # the spec module belongs to the front half; avoid an import cycle
    from gpubake.errors import BuildError
    from gpubake.images.spec import ImageSpec

ProgressFn = Callable[[str], None]


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
    compression: str = "zstd"  # layer compression of the archive: one of COMPRESSIONS


# Layer compressions of an exported image. zstd: smaller and several times faster to unpack
# than gzip, pulled by Docker >= 23, containerd >= 1.5, podman/CRI-O; zstd:chunked: zstd plus
# a table of contents that containers-storage (podman, CRI-O) uses for partial pulls (plain
# zstd to everything else); gzip: for older runtimes.
COMPRESSIONS = ("zstd", "zstd:chunked", "gzip")


@dataclass(frozen=True)
class Step:
    """One command of a build: argv, the variables set for it (never a secret), its cwd.

    The hooks run in-process around the command (`before`: checks and folders; `then`: reads
    what the command wrote, places files; `undo`: removes partial output when this or a later
    step fails; `watch`: a line of output -> a progress message; `explain`: the failure as
    one line). They are not part of the plan: not compared, not printed.
    """

    what: str  # one line: the progress message, and the prefix of a failure
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # set on top of the caller's environment
    cwd: Path | None = None
    stdout_only: bool = False  # the output is data (a manifest): stderr goes to the log only
    before: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    then: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    undo: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    watch: Callable[[str], str | None] | None = field(default=None, compare=False, repr=False)
    explain: Callable[[BuildError], BuildError] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        for name in self.env:  # a plan is printed: secrets reach a command by inheritance only
            if name in SECRET_ENV_VARS or is_secret_name(name):
                raise ValueError(f"build step {self.what!r}: {name} is a secret; it must not be part of a plan")

    def command(self) -> str:
        """The argv as one shell-quoted line (for people: `$ ...` in the dry run)."""
        return shlex.join(self.argv)

    def to_json(self) -> dict:
        """What `build-image --dry-run --json` prints for this step."""
        return {"what": self.what, "argv": list(self.argv), "env": dict(self.env), "cwd": str(self.cwd) if self.cwd else None}


@dataclass
class BuildResult:
    """What a finished build produced; `digest` is the image manifest digest (sha256:...)."""

    digest: str
    archive: Path | None
    layers: list[dict] = field(default_factory=list)  # {"digest": "sha256:...", "size": int}
    total_size: int = 0
    builder: str = ""
    seconds: float = 0.0
    storage_driver: str = ""  # buildah's store driver: digests are reproducible per driver, not across them

    def to_json(self) -> dict:
        """The fields `build-image --json` prints."""
        return {
            "digest": self.digest,
            "archive": str(self.archive) if self.archive else None,
            "layers": self.layers,
            "total_size": self.total_size,
            "builder": self.builder,
            "storage_driver": self.storage_driver or None,
            "seconds": round(self.seconds, 3),
        }


@runtime_checkable
class Builder(Protocol):
    """A tool that turns a rendered context into an image (buildah, docker, packer)."""

    name: str
    install_hint: str  # what to install when `available()` is False

    def available(self) -> bool:
        """True when the tool is installed and usable right now (daemon reachable, ...)."""
        ...

    def plan(self, req: BuildRequest) -> list[Step]:
        """The commands `build(req)` would run now, in order (it may probe caches; it writes nothing)."""
        ...

    def build(self, req: BuildRequest, on_progress: ProgressFn | None = None) -> BuildResult:
        """Run `plan(req)`; raise `BuildError` (one line, log file named) on failure."""
        ...
