"""What the build side may call of the checkpoint code: make, fetch, quantize, import, publish weights.

`gpubake.images.model_layer` bakes an image's weights on the host with these (the code
the image itself runs for `gpubake fetch` / `quantize` / `import`), and `push-weights`
uploads a checkpoint with them. This module is the build side's one door into provisioning
(pyproject.toml's import-linter contracts hold it to that).

`code_identity()` names the code that decides a generated checkpoint's bytes, for the
model cache's key: it follows the imports of the checkpoint makers, module-level and
function-level alike, rather than a list of file names, so renaming, adding or splitting
a module changes the key instead of silently dropping out of it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
from functools import cache
from pathlib import Path
from typing import Any

from gpubake.provisioning.fetch import fetch
from gpubake.provisioning.importers.convert import import_checkpoint as _convert
from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest
from gpubake.provisioning.quantize import default_device as quantize_device
from gpubake.provisioning.quantize import quantize_checkpoint
from gpubake.provisioning.s3 import parse_s3_uri, upload_dir
from gpubake.provisioning.tiny import make_tiny

__all__ = [
    "BASE_FILES", "MANIFEST_NAME", "code_files", "code_identity", "fetch", "import_checkpoint", "make_tiny",
    "manifest_sha256", "parse_s3_uri", "quantize_checkpoint", "quantize_device", "read_manifest", "upload_dir",
]

# The entry points whose code (and everything it imports) writes a checkpoint's bytes.
MAKERS = (make_tiny.__module__, quantize_checkpoint.__module__, _convert.__module__)

# What an imported checkpoint takes from its diffusers base (Wan 2.2 T2V/I2V A14B): every
# component but the experts' weights, and the experts' configs. Of the ~126 GB of
# Wan-AI/Wan2.2-T2V-A14B-Diffusers, ~12 GB (the UMT5-XXL encoder, the VAE).
BASE_FILES = ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "vae/*",
              "transformer/config.json", "transformer_2/config.json")


def import_checkpoint(source: str, dest: str | os.PathLike[str], fmt: str, *, base: str,
                      files: list[str] | None = None, model_id: str | None = None,
                      progress: bool = True, precision: str | None = None) -> dict[str, Any]:
    """`gpubake import SOURCE DEST --format FMT --base BASE`, fetching only what it reads:
    `files` of SOURCE (all when None) and, of an hf:// BASE, `BASE_FILES`. The manifest
    records both URIs and every file's sha256 (`importers.convert`). `precision` (the spec's
    `model.quantization`, nvfp4 | fp8): a source of another precision is refused before writing."""
    base_files = list(BASE_FILES) if base.startswith("hf://") else None
    return _convert(source, dest, fmt, base=base, model_id=model_id, progress=progress, files=files,
                    base_files=base_files, precision=precision)


def import_precisions(fmt: str) -> tuple[str, ...]:
    """The precisions ("nvfp4", "fp8") `gpubake import` reads of producer `fmt`'s checkpoints
    (an image spec's `model.format`): the importers' producer table, `importers.detect.PRODUCERS`."""
    from gpubake.provisioning.importers.detect import PRODUCERS

    return tuple(p for (name, p) in PRODUCERS if name == fmt)


_DATA_SUFFIXES = (".toml", ".json")  # package data read beside the code (e.g. policies.toml)


def manifest_sha256(checkpoint: Path) -> str:
    """sha256 of a checkpoint's manifest: what a spec's `model.sha256` pins."""
    return hashlib.sha256((Path(checkpoint) / MANIFEST_NAME).read_bytes()).hexdigest()


_ROOT = Path(__file__).resolve().parents[1]  # the gpubake package directory


def _origin(module: str) -> Path | None:
    """The source file of a gpubake module, found on disk (no module code runs)."""
    parts = module.split(".")
    if parts[0] != "gpubake":
        return None
    base = _ROOT.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(module: str, path: Path) -> set[str]:
    """gpubake modules named by `import` statements anywhere in the file (lazy ones too)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if _origin(name) is not None}


def code_files() -> dict[str, Path]:
    """{module or data name: file} of the makers' import closure and its package data."""
    files: dict[str, Path] = {}
    todo = list(MAKERS)
    while todo:
        module = todo.pop()
        path = _origin(module)
        if module in files or path is None:
            continue
        files[module] = path
        todo.extend(_imports(module, path))
    for directory in sorted({p.parent for p in files.values()}):
        for data in sorted(directory.iterdir()):
            if data.suffix in _DATA_SUFFIXES and data.is_file():
                files[data.relative_to(_ROOT).as_posix()] = data
    return files


@cache
def code_identity() -> str:
    """sha256 over the source of every module and data file in `code_files()`."""
    h = hashlib.sha256()
    for name, path in sorted(code_files().items()):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
