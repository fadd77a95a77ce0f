"""The image catalog: the spec files shipped in `images/catalog/`, found by name.

A name is a file stem (`demo` -> `catalog/demo.toml`). `find` also accepts a path to a
spec file of the user's own, so `build-image --image ./my.toml` checks it the same way.
"""

from __future__ import annotations

from pathlib import Path

from gpubake.errors import SpecError
from gpubake.images.spec import CATALOG_DIR, ImageSpec, load_spec

__all__ = ["CATALOG_DIR", "DEFAULT_IMAGE", "all_specs", "find", "is_path", "names", "path_of"]
DEFAULT_IMAGE = "demo"


def names() -> list[str]:
    """Names of the shipped images, sorted."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.toml"))


def is_path(name_or_path: str) -> bool:
    """True when `--image` names a spec file rather than a catalog entry."""
    return name_or_path.endswith(".toml") or "/" in name_or_path


def path_of(name_or_path: str) -> Path:
    """The spec file for a catalog name (or the given path); unknown names list the known ones."""
    if is_path(name_or_path):
        return Path(name_or_path)
    path = CATALOG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise SpecError(f"unknown image {name_or_path!r} (known: {', '.join(names())})")
    return path


def find(name_or_path: str) -> ImageSpec:
    """Load and validate the spec named `name_or_path` (see `gpubake.images.spec.load_spec`)."""
    return load_spec(path_of(name_or_path))


def all_specs() -> list[ImageSpec]:
    """Every shipped spec, validated (fails on the first invalid one)."""
    return [find(n) for n in names()]
