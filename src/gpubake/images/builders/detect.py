"""Pick a builder: the one asked for, else the first usable of buildah, docker, packer.

Order: buildah first (daemonless, reproducible, the CI path), docker when its daemon
answers, packer last (it needs a docker daemon or a cloud account to do anything).
"""

from __future__ import annotations

from gpubake.errors import BuildError
from gpubake.images.builders.base import Builder

BUILDER_NAMES = ("buildah", "docker", "packer")
_INSTALL = "install buildah and skopeo (apt-get install buildah skopeo, or run scripts/setup.sh)"


def _make(name: str) -> Builder:
    if name == "buildah":
        from gpubake.images.builders.buildah import BuildahBuilder

        return BuildahBuilder()
    if name == "docker":
        from gpubake.images.builders.docker import DockerBuilder

        return DockerBuilder()
    if name == "packer":
        try:
            from gpubake.images.builders.packer import PackerBuilder
        except ImportError:
            raise BuildError("--builder packer: the packer builder is not part of this installation") from None
        return PackerBuilder()
    raise BuildError(f"--builder: unknown builder {name!r} (choose {', '.join(BUILDER_NAMES)})")


def detect_builder(preferred: str | None = None) -> Builder:
    """The `preferred` builder if usable, else the first usable one; `BuildError` if none."""
    if preferred:
        builder = _make(preferred)
        if not builder.available():
            hint = {"buildah": _INSTALL, "docker": "install docker with buildx and start its daemon", "packer": "install packer and docker"}
            raise BuildError(f"--builder {preferred}: not usable here; {hint.get(preferred, '')}")
        return builder
    for name in BUILDER_NAMES:
        try:
            builder = _make(name)
        except BuildError:
            continue
        if builder.available():
            return builder
    raise BuildError(f"no image builder found (buildah, docker or packer): {_INSTALL}")
