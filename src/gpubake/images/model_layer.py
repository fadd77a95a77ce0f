"""The model weights of an image: prepared on the host, placed in the context's `model/`.

Why on the host: the Containerfile COPYs `model/` as the image's last layer, so the layer's
digest depends only on the checkpoint bytes (a code change never re-pushes weights), and
the build itself needs no network or GPU. The checkpoint comes from the checkpoint part's
API for the build side, `gpubake.provisioning.bake`: `generate:tiny` -> `make_tiny(seed=0)`;
`model.format` (another tool's NVFP4 checkpoint, e.g. LightX2V's) -> `import_checkpoint`
of `model.source` (its `model.files`) with `model.base` (the diffusers checkpoint giving the
text encoder, VAE, tokenizer and configs), both pinned by revision; other sources ->
`fetch`; `quantization = "nvfp4"` on a BF16 checkpoint -> `quantize_checkpoint`. Results
are cached under ~/.cache/gpubake/models/<key>, the key hashing the model fields of the
spec and, for checkpoints our code writes (generated, imported), the source of that code
(`bake.code_identity()`), and hard-linked into the context (copied across file systems).
A spec's `model.sha256` pins the sha256 of the checkpoint's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from gpubake import __version__
from gpubake.errors import BuildError, GpubakeError
from gpubake.fsutil import atomic_path
from gpubake.images.builders.storage import cache_root
from gpubake.images.spec import ImageSpec, check_pinned
from gpubake.provisioning import bake
from gpubake.provisioning.bake import MANIFEST_NAME, manifest_sha256

__all__ = ["MODEL_DIR", "cached_model", "describe", "model_key", "prepare_model"]

MODEL_DIR = "model"  # the weights' folder inside a build context


def model_key(spec: ImageSpec) -> str:
    """Cache key: the spec's model table, gpubake's version and the checkpoint code."""
    doc = {"model": spec.model.model_dump(mode="json"), "version": __version__}
    if spec.model.source == "generate:tiny" or spec.model.format is not None:
        doc["code"] = bake.code_identity()  # generated and imported bytes depend on our code, fetched ones do not
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def describe(spec: ImageSpec) -> dict[str, object]:
    """How `prepare_model` makes the spec's checkpoint, for `build-image --dry-run`."""
    m = spec.model
    out: dict[str, object] = {"model": m.id, "quantization": m.quantization, "source": m.source}
    if m.format is None:
        made = "generate" if m.source == "generate:tiny" else "fetch"
        out["how"] = made + (f", quantize a BF16 checkpoint ({m.policy} policy)" if m.quantization == "nvfp4" else "")
        out["detail"] = f"{m.id} from {m.source} ({m.quantization})"
        return out
    files = ", ".join(m.files) if m.files else "all files"
    out.update(how=f"import --format {m.format}", files=list(m.files) if m.files else None, base=m.base,
               base_files=list(bake.BASE_FILES), unpinned=m.unpinned)
    out["detail"] = (f"{m.id}: import {m.format} {m.source} ({files}) with base {m.base} "
                     f"(text encoder, VAE, tokenizer, configs) ({m.quantization})")
    if m.unpinned:
        out["detail"] += f"; NOT PINNED: {', '.join('model.' + n for n in m.unpinned)} (the build refuses)"
    return out


def _make(spec: ImageSpec, dest: Path) -> None:
    """Produce the checkpoint the spec asks for into `dest` (which must not exist)."""
    if spec.model.format is not None:
        m = spec.model
        assert m.base is not None  # the spec requires it with a format
        bake.import_checkpoint(m.source, dest, m.format, base=m.base, files=list(m.files) if m.files else None,
                               model_id=m.id, progress=False)
        return
    work = dest.parent / (dest.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        raw = work / "source"
        if spec.model.source == "generate:tiny":
            bake.make_tiny(raw, seed=0)
        else:
            bake.fetch(spec.model.source, raw, sha256=spec.model.sha256, progress=False)
        fmt = bake.read_manifest(raw).get("format") if (raw / MANIFEST_NAME).is_file() else "bf16"
        if spec.model.quantization == "nvfp4" and fmt != "nvfp4":
            bake.quantize_checkpoint(raw, dest, spec.model.policy, progress=False, model_id=spec.model.id)
        else:
            os.replace(raw, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cached_model(spec: ImageSpec) -> Path:
    """The spec's checkpoint in the cache, made on first use."""
    final = cache_root() / "models" / model_key(spec)
    if not (final / MANIFEST_NAME).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final) as tmp:
            _make(spec, tmp)
    return final


def _link_tree(src: Path, dest: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link)


def prepare_model(spec: ImageSpec, context_dir: str | os.PathLike[str]) -> Path:
    """Place the spec's checkpoint at `<context_dir>/model`; return that path.

    Raises `BuildError` (one line) when the checkpoint cannot be made or does not match
    the spec's `model.sha256`.
    """
    dest = Path(context_dir) / MODEL_DIR
    if dest.exists():
        raise BuildError(f"{dest}: already exists; render a fresh context")
    check_pinned(spec)  # a placeholder revision builds nothing
    try:
        src = cached_model(spec)
    except GpubakeError as exc:
        raise BuildError(f"model {spec.model.id} ({spec.model.source}): {exc}") from None
    if spec.model.sha256 and manifest_sha256(src) != spec.model.sha256:
        raise BuildError(
            f"model.sha256: {spec.model.id} manifest is sha256:{manifest_sha256(src)}, spec pins {spec.model.sha256}"
        )
    _link_tree(src, dest)
    return dest
