"""The catalog: names, lookup by name or path, unknown names listing the known ones."""

from __future__ import annotations

import pytest

from gpubake.errors import SpecError
from gpubake.images import catalog


def test_names_are_the_toml_stems_sorted() -> None:
    names = catalog.names()
    assert names == sorted(p.stem for p in catalog.CATALOG_DIR.glob("*.toml"))
    assert catalog.DEFAULT_IMAGE in names


def test_unknown_image_lists_known_names() -> None:
    with pytest.raises(SpecError) as info:
        catalog.find("wan23")
    assert str(info.value) == f"unknown image 'wan23' (known: {', '.join(catalog.names())})"


def test_find_by_path_is_the_same_spec() -> None:
    by_path = catalog.find(str(catalog.CATALOG_DIR / "demo.toml"))
    assert by_path == catalog.find("demo")


def test_all_specs_have_distinct_names_and_lock_files() -> None:
    specs = catalog.all_specs()
    assert len({s.name for s in specs}) == len(specs)
    assert all(s.lock_path.is_file() for s in specs)
