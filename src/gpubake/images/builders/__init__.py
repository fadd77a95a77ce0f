"""Image builders: buildah (default, daemonless), docker buildx, packer.

`detect_builder(preferred)` picks one; all share `BuildRequest`/`BuildResult`, and each
one's `plan(req)` lists the `Step`s its `build(req, on_progress)` runs.
"""

from __future__ import annotations

from gpubake.images.builders.base import Builder, BuildRequest, BuildResult, Step

__all__ = ["BUILDER_NAMES", "Builder", "BuildRequest", "BuildResult", "Step", "detect_builder", "make_builder"]


def __getattr__(name: str):  # lazy: detect imports every builder module
    if name in ("detect_builder", "make_builder", "BUILDER_NAMES"):
        from gpubake.images.builders import detect

        return getattr(detect, name)
    raise AttributeError(name)
