"""Build spec files for tests: a real catalog spec, copied with its lock, then edited as text."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from gpubake.images.catalog import CATALOG_DIR


def write_spec(tmp_path: Path, name: str = "custom", *, based_on: str = "wan22-ti2v-5b", edits: list[tuple[str, str]] = ()) -> Path:
    """Copy catalog spec `based_on` (and its lock) into tmp_path as `<name>.toml`, applying regex edits."""
    src = CATALOG_DIR / f"{based_on}.toml"
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
