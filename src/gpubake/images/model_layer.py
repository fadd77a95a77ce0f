"""The model weights of an image: prepared on the host, staged in the context's `model/` as layers.

Why on the host: the Containerfile COPYs each folder `model/<layer>/` as one layer, so a
layer's digest depends only on its checkpoint bytes (a code change never re-pushes
weights), and the build itself needs no network or GPU. The checkpoint comes from the
checkpoint part's API for the build side, `gpubake.provisioning.bake`: `generate:tiny` ->
`make_tiny(seed=0)`; `model.format` (another tool's NVFP4 or FP8 checkpoint, e.g.
LightX2V's) -> `import_checkpoint` of `model.source` (its `model.files`) with `model.base`
(the diffusers checkpoint giving the text encoder, VAE, tokenizer and configs), both pinned
by revision; other sources -> `fetch`; a quantized `quantization` (`spec.QUANTIZED`: "nvfp4",
"fp8") on a BF16/fp32 checkpoint -> `quantize_checkpoint` in that format, on this machine's
GPU when torch sees one (seconds an expert), else on every CPU core, with a progress bar and
an ETA per shard; a source already quantized in another format is refused (`needs_quantizing`). Results are
cached under ~/.cache/gpubake/models/<key>, the key hashing the spec's model table
(source with its pinned revision, quantization, policy), gpubake's version and the source
of the code that makes or quantizes the bytes (`bake.code_identity()`), for every source:
a quantizer fix can never reuse old NVFP4 bytes. Files are hard-linked into the context
(copied across file systems). A spec's `model.sha256` pins the sha256 of the checkpoint's
manifest. Which file goes in which layer: `gpubake.images.layers`.
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
from gpubake.images import layers as weight_layers
from gpubake.images.builders.storage import cache_root
from gpubake.images.spec import QUANTIZED, ImageSpec, check_pinned
from gpubake.provisioning import bake
from gpubake.provisioning.bake import MANIFEST_NAME, manifest_sha256

__all__ = ["MODEL_DIR", "PLAN_FILE", "cached_model", "cached_path", "describe", "model_key", "needs_quantizing",
           "plan_for_build", "prepare_model", "read_plan", "weights_plan"]

MODEL_DIR = "model"  # the weights' folder inside a build context: one sub-folder per layer
PLAN_FILE = "weights.json"  # the context's layer plan (written by render, read when the weights are staged)


def model_key(spec: ImageSpec) -> str:
    """Cache key: the spec's model table, gpubake's version and the code that makes or quantizes the bytes."""
    m = spec.model
    doc = {"model": m.model_dump(mode="json", exclude={"at"}), "version": __version__, "code": bake.code_identity()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cached_path(spec: ImageSpec) -> Path:
    return cache_root() / "models" / model_key(spec)


def describe(spec: ImageSpec) -> dict[str, object]:
    """How `prepare_model` makes the spec's checkpoint, for `build-image --dry-run`."""
    m = spec.model
    out: dict[str, object] = {"model": m.id, "quantization": m.quantization, "source": m.source}
    if m.format is None:
        made = "generate" if m.source == "generate:tiny" else "fetch"
        out["how"] = made + (f", quantize a BF16 checkpoint to {QUANTIZED[m.quantization]} ({m.policy} policy)"
                             if m.quantization in QUANTIZED else "")
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
                               model_id=m.id, progress=False, precision=m.quantization)
        return
    work = dest.parent / (dest.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        raw = work / "source"
        if spec.model.source == "generate:tiny":
            bake.make_tiny(raw, seed=0)
        else:
            bake.fetch(spec.model.source, raw, sha256=spec.model.sha256, progress=True)
        fmt = bake.read_manifest(raw).get("format") if (raw / MANIFEST_NAME).is_file() else "bf16"
        if needs_quantizing(spec, str(fmt)):
            _quantize(spec, raw, dest)
        else:
            os.replace(raw, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def needs_quantizing(spec: ImageSpec, fmt: str) -> bool:
    """Whether a source whose manifest says `fmt` must be quantized to the spec's format.

    A source already quantized in another format is refused (one line): requantizing an
    NVFP4 checkpoint to FP8 would bake the 4-bit rounding into 8-bit weights, and baking it
    as it is would ship a format the spec (and image.json) does not say."""
    want = spec.model.quantization
    if fmt in QUANTIZED and fmt != want:
        raise BuildError(f"model.source: {spec.model.source} is already quantized ({QUANTIZED[fmt]}), but "
                         f'model.quantization = "{want}": give a BF16 source, or set quantization = "{fmt}"')
    return want in QUANTIZED and fmt != want


def _quantize(spec: ImageSpec, raw: Path, dest: Path) -> None:
    """`gpubake quantize RAW DEST --format Q` through the checkpoint code's API."""
    m = spec.model
    bake.quantize_checkpoint(raw, dest, m.policy, device=bake.quantize_device(), progress=True, model_id=m.id,
                             fmt=m.quantization)


def cached_model(spec: ImageSpec) -> Path:
    """The spec's checkpoint in the cache, made on first use."""
    check_pinned(spec)  # a placeholder revision builds nothing
    final = cached_path(spec)
    if not (final / MANIFEST_NAME).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(final) as tmp:
                _make(spec, tmp)
        except GpubakeError as exc:
            raise BuildError(f"model {spec.model.id} ({spec.model.source}): {exc}") from None
    if spec.model.sha256 and manifest_sha256(final) != spec.model.sha256:
        raise BuildError(
            f"model.sha256: {spec.model.id} manifest is sha256:{manifest_sha256(final)}, spec pins {spec.model.sha256}"
        )
    return final


def weights_plan(spec: ImageSpec) -> list[weight_layers.WeightLayer]:
    """The layers a context renders now: exact when the checkpoint is cached, else the estimate;
    none when the weights come at boot."""
    if spec.model.at == "boot":
        return []
    cached = cached_path(spec)
    if (cached / MANIFEST_NAME).is_file():
        return weight_layers.plan_checkpoint(cached, sources=weight_layers.component_sources(spec))
    return weight_layers.estimated_layers(spec)


def plan_for_build(spec: ImageSpec) -> list[weight_layers.WeightLayer]:
    """Make (or reuse) the checkpoint, then its exact layer plan: what a build renders with."""
    if spec.model.at == "boot":
        return []
    cached_model(spec)
    return weights_plan(spec)


def read_plan(context_dir: Path) -> list[weight_layers.WeightLayer]:
    """The layer plan a context was rendered with (its `weights.json`)."""
    path = Path(context_dir) / PLAN_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return [weight_layers.WeightLayer(name=x["name"], component=x["component"], bytes=int(x["bytes"]),
                                          source=x.get("source", ""), estimated=bool(x.get("estimated")))
                for x in doc["layers"]]
    except FileNotFoundError:
        raise BuildError(f"{path}: missing; render the context with gpubake.images.render") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"{path}: not a layer plan ({exc})") from None


def prepare_model(spec: ImageSpec, context_dir: str | os.PathLike[str]) -> Path:
    """Stage the spec's checkpoint in `<context_dir>/model/<layer>/`, as the context's plan
    (`weights.json`) lays it out; return `<context_dir>/model`.

    Raises `BuildError` (one line) when the checkpoint cannot be made, does not match the
    spec's `model.sha256`, or does not fit the plan.
    """
    check_pinned(spec)  # a placeholder revision builds nothing (before anything is read or made)
    dest = Path(context_dir) / MODEL_DIR
    if dest.exists():
        raise BuildError(f"{dest}: already exists; render a fresh context")
    planned = read_plan(Path(context_dir))
    if spec.model.at == "boot" or not planned:
        return dest
    src = cached_model(spec)
    staged = weight_layers.assign(planned, weight_layers.checkpoint_sizes(src))
    weight_layers.stage(src, staged, dest)
    return dest
