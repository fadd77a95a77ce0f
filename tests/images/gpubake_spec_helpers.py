"""Build spec files for tests: a real catalog spec, copied with its lock, then edited as text."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from gpubake.images.catalog import CATALOG_DIR

SPECS = Path(__file__).parent / "data" / "specs"  # test specs beside the catalog's (same locks)


def write_spec(tmp_path: Path, name: str = "custom", *, based_on: str = "cuda-base", edits: list[tuple[str, str]] = ()) -> Path:
    """Copy spec `based_on` (the catalog's, else tests/images/data/specs/; with its lock) into
    tmp_path as `<name>.toml`, applying regex edits. The default, cuda-base, is TI2V-5B on the
    nvidia/cuda base (a base.image pinned by digest)."""
    src = CATALOG_DIR / f"{based_on}.toml"
    if not src.is_file():
        src = SPECS / f"{based_on}.toml"
    text = src.read_text(encoding="utf-8")
    text = re.sub(r'^name = ".*"$', f'name = "{name}"', text, count=1, flags=re.M)
    for pattern, repl in edits:
        new = re.sub(pattern, repl, text, count=1, flags=re.M)
        assert new != text, f"edit {pattern!r} matched nothing in {src.name}"
        text = new
    lock = re.search(r'^lock = "(.*)"$', text, flags=re.M)
    if lock:
        dest_lock = tmp_path / lock.group(1)
        dest_lock.parent.mkdir(parents=True, exist_ok=True)
        if not dest_lock.exists() and (CATALOG_DIR / lock.group(1)).exists():
            shutil.copyfile(CATALOG_DIR / lock.group(1), dest_lock)
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path
