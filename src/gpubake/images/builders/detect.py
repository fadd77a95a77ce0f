"""Pick a builder: the one asked for, else the first usable of buildah, docker, packer.

Order: buildah first (daemonless, reproducible, the CI path), docker when its daemon
answers, packer last (it needs a docker daemon or a cloud account to do anything).
`BUILDERS` is the one list of builder names (the CLI's `--builder` choices come from it).
"""

from __future__ import annotations

import importlib

from gpubake.errors import BuildError
from gpubake.images.builders.base import Builder

# name -> "module:class", in detection order.
BUILDERS = {
    "buildah": "gpubake.images.builders.buildah:BuildahBuilder",
    "docker": "gpubake.images.builders.docker:DockerBuilder",
    "packer": "gpubake.images.builders.packer:PackerBuilder",
}
BUILDER_NAMES = tuple(BUILDERS)


def make_builder(name: str) -> Builder:
    """The builder called `name`, whether or not its tools are usable here."""
    if name not in BUILDERS:
        raise BuildError(f"--builder: unknown builder {name!r} (choose {', '.join(BUILDER_NAMES)})")
    module, _, cls = BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def detect_builder(preferred: str | None = None) -> Builder:
    """The `preferred` builder if usable, else the first usable one; `BuildError` if none."""
    if preferred:
        builder = make_builder(preferred)
        if not builder.available():
            raise BuildError(f"--builder {preferred}: not usable here; {builder.install_hint}")
        return builder
    for name in BUILDER_NAMES:
        builder = make_builder(name)
        if builder.available():
            return builder
    names = f"{', '.join(BUILDER_NAMES[:-1])} or {BUILDER_NAMES[-1]}"
    raise BuildError(f"no image builder found ({names}): {make_builder(BUILDER_NAMES[0]).install_hint}")
