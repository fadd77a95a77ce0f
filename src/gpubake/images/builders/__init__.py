"""Image builders: buildah (default, daemonless), docker buildx, packer.

`detect_builder(preferred)` picks one; all share `BuildRequest`/`BuildResult`.
"""

from __future__ import annotations

from gpubake.images.builders.base import Builder, BuildRequest, BuildResult

__all__ = ["Builder", "BuildRequest", "BuildResult", "detect_builder"]


def __getattr__(name: str):  # lazy: detect imports every builder module
    if name == "detect_builder":
        from gpubake.images.builders.detect import detect_builder

        return detect_builder
    raise AttributeError(name)
