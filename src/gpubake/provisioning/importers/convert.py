"""`gpubake import SRC DEST`: another tool's NVFP4 or FP8 Wan checkpoint -> a gpubake checkpoint.

Everything is checked before anything is written: the source's layout, each expert's
tensor names (Wan's original names mapped to diffusers' by diffusers' own conversion),
that every tensor WanTransformer3DModel (built from the expert's config on the meta
device) expects is there with its shape, that each quantized layer holds exactly its
producer's tensors with their dtypes and shapes, every scale's value, and the source
files' sha256 (against the source's gpubake manifest when it has one, as `fetch`
leaves). Then DEST is assembled in a temporary folder beside it and renamed into place:
a failure leaves nothing at DEST.

What is written: the quantized linears in gpubake's layout of the source's precision
(`target.py`: an NVFP4 source gives an `nvfp4` checkpoint, an FP8 one an `fp8` checkpoint
as `gpubake quantize --format fp8` writes it), converted exactly (nibble order, scale
layout, global and activation scales: see each producer's module); every other transformer tensor copied unchanged; the expert configs (the
source's, without its `quantization_config`, else `--base`'s); the other pipeline
components (text encoder, VAE, tokenizer, scheduler, model_index) copied byte for
byte from the source when it has them, else from `--base`; and the manifest, with the
source format, the source files' sha256 and per-layer statistics.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.fsutil import atomic_path, sha256_file, write_json_atomic
from gpubake.provisioning import layout
from gpubake.provisioning.importers import target, wan_names
from gpubake.provisioning.importers.detect import FORMATS, PRECISIONS, detect, precision, producer
from gpubake.provisioning.importers.producer import Producer
from gpubake.provisioning.importers.source import Expert, Source, SourceError, TensorInfo, discover, read_headers
from gpubake.provisioning.manifest import (
    MANIFEST_NAME,
    build_manifest,
    is_disk_full,
    normalise_modes,
    read_manifest,
    write_manifest,
)

SHARD_BYTES = 4 << 30  # output shards of at most ~4 GiB, whatever the source's sharding
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
DROPPED_CONFIG_KEYS = ("quantization_config",)
# WanTimeTextImageEmbedding.forward: next(iter(self.time_embedder.parameters())).dtype;
# NVFP4Linear and FP8Linear hold buffers only, so a quantized time embedder has no parameters
UNSUPPORTED_QUANTIZED = "condition_embedder.time_embedder."


@dataclass
class QLayer:
    out_f: int
    in_f: int
    parts: dict[str, TensorInfo]


@dataclass
class ExpertPlan:
    expert: Expert
    producer: Producer
    config_path: Path
    config: dict[str, Any]
    names: dict[str, str]                       # diffusers name -> source key
    naming: str = "diffusers"                   # the source's: original | diffusers
    kept: dict[str, TensorInfo] = field(default_factory=dict)
    quantized: dict[str, QLayer] = field(default_factory=dict)
    dummies: dict[str, TensorInfo] = field(default_factory=dict)  # no-op scales beside unquantized weights (1.0, dropped)


class Reader:
    """Open safetensors files once; read tensors by TensorInfo."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}

    def __call__(self, info: TensorInfo) -> Any:
        from safetensors import safe_open

        f = self._open.get(info.file)
        if f is None:
            f = self._open[info.file] = safe_open(str(info.file), framework="pt")
        return f.get_tensor(info.key)


# --------------------------------------------------------------------------- entry point


def import_checkpoint(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    base: str | os.PathLike[str] | None = None,
    model_id: str | None = None,
    progress: bool = True,
    files: list[str] | None = None,
    base_files: list[str] | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Import `src` (local path or any `fetch` source) into `dest`; returns a summary.
    `files` / `base_files`: fetch only these files (globs) of an hf:// SRC / --base;
    `precision` (nvfp4 | fp8): refuse, before writing, a source of another precision."""
    t0 = time.monotonic()
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GpubakeError(f"{dest}: already exists and is not empty (remove it or choose another DEST)")
    if fmt not in FORMATS:
        raise SourceError(f"--format: unknown format {fmt!r} ({', '.join(FORMATS)})")
    if precision is not None and precision not in PRECISIONS:
        raise SourceError(f"precision: unknown {precision!r} ({', '.join(PRECISIONS)})")
    if model_id:
        from gpubake.provisioning.models import get_model

        get_model(model_id)
    with contextlib.ExitStack() as stack:
        src_root = _local(str(src), dest, stack, "SRC", progress, files)
        base_root = _local(str(base), dest, stack, "--base", progress, base_files) if base is not None else None
        source = discover(src_root)
        base_index = layout.model_index(base_root) if base_root is not None else None
        index, index_root = (source.model_index, src_root) if source.model_index else (base_index, base_root)
        if index is None or index_root is None:
            raise SourceError(f"{src_root}: holds only the transformer weights; pass --base with the matching "
                              "diffusers checkpoint (text encoder, VAE, tokenizer, scheduler, configs)")
        experts = layout.expert_dirs(index)
        if sorted(experts) != sorted(source.experts):
            raise SourceError(f"{src_root}: holds {_experts_text(sorted(source.experts))}, but "
                              f"{index_root / 'model_index.json'} has {_experts_text(experts)}")
        components = _components(index, experts, source, src_root, base_root)
        # hashes first: a corrupt file is reported as corrupt, not as whatever it now looks like
        src_files, base_files = _used_files(source, src_root, components, index_root, base_root)
        src_record = _hashes(src_root, src_files)
        base_record = _hashes(base_root, base_files) if base_root is not None and base_files else None
        plans = {e: _plan_expert(source.experts[e], fmt, base_root) for e in experts}
        formats = {f"{p.producer.name} {p.producer.precision.upper()}" for p in plans.values()}
        if len(formats) > 1:
            raise SourceError(f"{src_root}: the experts are in different formats ({', '.join(sorted(formats))})")
        (prec,) = {p.producer.precision for p in plans.values()}
        if precision is not None and prec != precision:
            raise SourceError(f"{src}: holds an {prec.upper()} checkpoint, but {precision} was asked for "
                              f"(the image's model.quantization)")
        mid = model_id or _manifest_model_id(base_root) or _manifest_model_id(src_root)
        t_check = time.monotonic() - t0
        result = _write(dest, plans, components, index_root, mid, progress, source, str(src),
                        None if base is None else str(base), src_record, base_record,
                        next(iter(plans.values())).producer)
    result["validate_hash_seconds"] = round(t_check, 3)
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


def _experts_text(names: list[str]) -> str:
    return f"{len(names)} expert{'s' if len(names) != 1 else ''} ({', '.join(names)})"


def _local(uri: str, dest: Path, stack: contextlib.ExitStack, flag: str, progress: bool,
           files: list[str] | None = None) -> Path:
    """A local path for SRC/--base: fetched first (verified; only `files`) when it is a URI."""
    if "://" in uri:
        from gpubake.provisioning.fetch import fetch

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{dest.name}.{flag.strip('-')}-",
                                                                     dir=dest.parent)))
        fetch(uri, tmp / "src", progress=progress, files=files)
        return tmp / "src"
    path = Path(uri).expanduser()
    if not path.exists():
        raise SourceError(f"{flag} {uri}: no such file or folder")
    return path


def _manifest_model_id(root: Path | None) -> str | None:
    if root is None or not root.is_dir() or not (root / MANIFEST_NAME).is_file():
        return None
    return read_manifest(root).get("model_id")


# --------------------------------------------------------------------------- validation


def _plan_expert(expert: Expert, fmt: str, base_root: Path | None) -> ExpertPlan:
    where = expert.files[0] if len(expert.files) == 1 else expert.files[0].parent
    read_headers(expert)
    try:
        names = wan_names.normalize(list(expert.tensors))
        naming = wan_names.naming([wan_names.strip_prefix(k) for k in expert.tensors])
    except wan_names.NamingError as exc:
        raise SourceError(f"{where}: {exc}") from None
    prec = precision(expert)
    prod = producer(detect(expert, naming, prec) if fmt == "auto" else fmt, prec)
    prod.prepare(expert, names)
    for marker in prod.markers:  # file-level format markers: read by the producer, not tensors of the model
        names.pop(marker, None)
    cfg_path = _config_path(expert, base_root)
    config = {k: v for k, v in layout.transformer_config(cfg_path.parent).items() if k not in DROPPED_CONFIG_KEYS}
    plan = ExpertPlan(expert, prod, cfg_path, config, names, naming)
    expected, linears = layout.expected_shapes(layout.empty_transformer(config))
    groups: dict[str, dict[str, TensorInfo]] = {}
    for name, key in sorted(names.items()):
        info = expert.tensors[key]
        module, _, suffix = name.rpartition(".")
        if module in linears:
            groups.setdefault(module, {})[suffix] = info
        elif name in expected:
            _check_kept(info, expected[name])
            plan.kept[name] = info
        else:
            raise SourceError(f"{info.where()}: unexpected tensor ({name!r} is not in WanTransformer3DModel "
                              f"with {cfg_path})")
    for module in sorted(linears):
        _plan_linear(plan, module, dict(groups.get(module, {})), expected, where)
    covered = set(plan.kept) | {f"{m}.weight" for m in plan.quantized}
    for name in sorted(expected):
        if name not in covered:
            raise SourceError(f"{where}: missing tensor {_stored_name(plan, name)} (shape {list(expected[name])})")
    read = Reader()
    for module, q in plan.quantized.items():  # the scales' values, before anything is written
        prod.scalars(module, lambda s, q=q: read(q.parts[s]), lambda s, q=q: q.parts[s].where(), set(q.parts))
    for info in plan.dummies.values():
        if info.shape not in ((), (1,)) or float(read(info).float().reshape(-1)[0]) != 1.0:
            raise SourceError(f"{info.where()}: beside an unquantized weight, a scale must be a scalar 1.0 "
                              f"(a no-op); this one is {list(info.shape)} {read(info).float().reshape(-1)[:1].tolist()}")
    return plan


def _config_path(expert: Expert, base_root: Path | None) -> Path:
    """The expert's config.json: beside its shards (diffusers layout), else --base's."""
    if expert.config is not None:
        return expert.config
    if base_root is not None and (base_root / expert.name / "config.json").is_file():
        return base_root / expert.name / "config.json"
    where = expert.files[0] if len(expert.files) == 1 else expert.files[0].parent
    raise SourceError(f"{where}: no config.json for {expert.name}; pass --base with the matching diffusers checkpoint")


def _stored_name(plan: ExpertPlan, name: str) -> str:
    """How the source would have named the diffusers tensor `name` (for errors)."""
    keys = list(plan.expert.tensors)
    prefix = next((p for p in wan_names.PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
    if plan.naming == "diffusers":
        return f"{prefix}{name}"
    try:
        (orig,) = wan_names.to_original([name])
    except wan_names.NamingError:
        return f"{name} (diffusers name)"
    return f"{prefix}{orig} ({name} in diffusers' names)"


def _check_kept(info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise SourceError(f"{info.where()}: dtype {info.dtype}, expected a floating-point tensor")
    if tuple(info.shape) != tuple(shape):
        raise SourceError(f"{info.where()}: shape {list(info.shape)}, expected {list(shape)}")


def _plan_linear(plan: ExpertPlan, module: str, parts: dict[str, TensorInfo],
                 expected: dict[str, tuple[int, ...]], where: Path) -> None:
    out_f, in_f = expected[f"{module}.weight"]
    bias = parts.pop("bias", None)
    if f"{module}.bias" in expected and bias is not None:
        _check_kept(bias, expected[f"{module}.bias"])
        plan.kept[f"{module}.bias"] = bias
    elif bias is not None:
        raise SourceError(f"{bias.where()}: unexpected tensor ({module} has no bias in WanTransformer3DModel)")
    if not parts:
        return  # reported as missing by the caller
    prod = plan.producer
    if "weight" not in parts and not prod.is_quantized(module, parts):
        stored_as = next(iter(parts.values())).key.rpartition(".")[0]
        raise SourceError(f"{where}: missing tensor {stored_as}.weight (its {', '.join(sorted(parts))} are here)")
    if not prod.is_quantized(module, parts):
        for suffix, info in parts.items():
            if suffix != "weight" and prod.dummy(module, suffix):
                plan.dummies[f"{module}.{suffix}"] = info
            elif suffix != "weight":
                raise SourceError(f"{info.where()}: unexpected tensor beside an unquantized weight")
        _check_kept(parts["weight"], (out_f, in_f))
        plan.kept[f"{module}.weight"] = parts["weight"]
        return
    if prod.precision == "nvfp4" and in_f % target.BLOCK:
        raise SourceError(f"{parts['weight'].where()}: in_features {in_f} is not a multiple of {target.BLOCK}")
    if module.startswith(UNSUPPORTED_QUANTIZED):
        raise SourceError(f"{parts['weight'].where()}: an {prod.precision.upper()} time embedder cannot run here (diffusers reads "
                          "its dtype from its parameters); quantize it with ModelOpt's Wan recipe, which keeps "
                          "condition_embedder unquantized")
    required, optional = prod.wants(module, out_f, in_f, set(parts))
    for suffix in required:
        if suffix not in parts:
            stored_as = (parts.get("weight") or next(iter(parts.values()))).key.rpartition(".")[0]
            raise SourceError(f"{where}: missing tensor {stored_as}.{suffix} of a {prod.name} {prod.precision.upper()} layer")
    for suffix, info in parts.items():
        want = required.get(suffix) or optional.get(suffix)
        if want is None:
            raise SourceError(f"{info.where()}: unexpected tensor for a {prod.name} {prod.precision.upper()} layer "
                              f"(expected {', '.join(sorted({*required, *optional}))})")
        want.check(info)
    plan.quantized[module] = QLayer(out_f, in_f, parts)


def _components(index: dict[str, Any], experts: list[str], source: Source, src_root: Path,
                base_root: Path | None) -> dict[str, Path]:
    """{component: folder to copy it from}: the source's own, else --base's."""
    out = {}
    for name, entry in sorted(index.items()):
        if name.startswith("_") or name in experts or not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        if source.layout == "diffusers" and (src_root / name).is_dir():
            out[name] = src_root / name
        elif base_root is not None and (base_root / name).is_dir():
            out[name] = base_root / name
        else:
            where = "--base" if base_root is None else str(base_root)
            raise SourceError(f"{src_root}: no {name}/ here or in {where}; pass --base with the matching diffusers checkpoint")
    return out


def _used_files(source: Source, src_root: Path, components: dict[str, Path],
                index_root: Path, base_root: Path | None) -> tuple[list[Path], list[Path]]:
    """The files read from the source and from --base (for hashes and the manifest)."""
    used: set[Path] = set()
    for expert in source.experts.values():
        used.update(expert.files)
        for d in {f.parent for f in expert.files}:
            used.update(d.glob("*.safetensors.index.json"))
        used.add(_config_path(expert, base_root))
    for comp in components.values():
        used.update(p for p in comp.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    used.add(index_root / "model_index.json")
    src_dir = src_root if src_root.is_dir() else src_root.parent
    src_files = sorted(p for p in used if _inside(p, src_dir))
    base_files = sorted(p for p in used if base_root is not None and _inside(p, base_root) and p not in src_files)
    return src_files, base_files


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _hashes(root: Path, files: list[Path]) -> dict[str, Any]:
    """sha256 and size of `files`, checked against `root`'s gpubake manifest if it has one."""
    from concurrent.futures import ThreadPoolExecutor

    base = root if root.is_dir() else root.parent
    manifest = read_manifest(base) if (base / MANIFEST_NAME).is_file() else None
    rels = [p.resolve().relative_to(base.resolve()).as_posix() for p in files]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files) or 1))) as pool:
        digests = list(pool.map(sha256_file, files))
    out: dict[str, Any] = {}
    for p, rel, digest in zip(files, rels, digests):
        size = p.stat().st_size
        if manifest is not None:
            entry = manifest["files"].get(rel)
            if entry is None:
                raise SourceError(f"{p}: not listed in {base / MANIFEST_NAME}")
            if entry["size"] != size or entry["sha256"] != digest:
                raise SourceError(f"{p}: sha256 {digest[:16]}… (size {size}) does not match "
                                  f"{base / MANIFEST_NAME} ({entry['sha256'][:16]}…, size {entry['size']})")
        out[rel] = {"sha256": digest, "size": size}
    return {"manifest_sha256": sha256_file(base / MANIFEST_NAME) if manifest is not None else None,
            "verified": "manifest" if manifest is not None else "none", "files": out}


# --------------------------------------------------------------------------- writing


def _write(dest: Path, plans: dict[str, ExpertPlan], components: dict[str, Path], index_root: Path,
           model_id: str | None, progress: bool, source: Source, src: str, base: str | None,
           src_record: dict[str, Any], base_record: dict[str, Any] | None, prod: Producer) -> dict[str, Any]:
    fmt, out_format = prod.name, prod.precision
    layers: dict[str, Any] = {}
    stats = {"quantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0,
             "dummies": sum(len(p.dummies) for p in plans.values())}
    try:
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            shutil.copyfile(index_root / "model_index.json", tmp / "model_index.json")
            for name, folder in components.items():
                shutil.copytree(folder, tmp / name, copy_function=shutil.copyfile,
                                ignore=shutil.ignore_patterns(MANIFEST_NAME))
            for name, plan in plans.items():
                _write_expert(plan, tmp / name, layers, stats, progress)
            normalise_modes(tmp)
            exact = [k for k, v in layers.items() if v["exact"]]
            input_key = "input_global_scale" if out_format == "nvfp4" else "input_scale"
            quant = {
                "format": out_format, **layout.QUANT_RECORDS[out_format], "imported_from": fmt,
                "experts": list(plans), "layers": layers,
                "summary": {"quantized_layers": stats["quantized"], "kept_tensors": stats["kept"],
                            "exact_layers": len(exact), "inexact_layers": len(layers) - len(exact),
                            "activation_scales": sum(1 for v in layers.values() if v[input_key] is not None),
                            "dropped_dummy_scales": stats["dummies"],
                            "sqnr_db_min": None, "sqnr_db_mean": None},
            }
            record = {"format": fmt, "uri": src, "layout": source.layout,
                      "experts": {n: sorted(_src_rel(f, source.root) for f in p.expert.files) for n, p in plans.items()},
                      **src_record}
            write_manifest(tmp, build_manifest(tmp, fmt=out_format, model_id=model_id, source=record,
                                               base=None if base is None else {"uri": base, **(base_record or {})},
                                               quantization=quant))
    except Exception as exc:
        if is_disk_full(exc):
            raise GpubakeError(f"{dest}: no space left on device while writing the imported checkpoint") from None
        raise
    return {
        "dest": str(dest), "format": fmt, "checkpoint_format": out_format, "experts": list(plans),
        "quantized_layers": stats["quantized"],
        "kept_tensors": stats["kept"], "exact_layers": quant["summary"]["exact_layers"],
        "inexact_layers": quant["summary"]["inexact_layers"],
        "activation_scales": quant["summary"]["activation_scales"], "model_id": model_id,
        "transformer_bytes_in": stats["bytes_in"], "transformer_bytes_out": stats["bytes_out"],
    }


def _src_rel(f: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    return f.resolve().relative_to(base.resolve()).as_posix()


def _write_config(plan: ExpertPlan, dest: Path) -> None:
    raw = json.loads(plan.config_path.read_text(encoding="utf-8"))
    if any(k in raw for k in DROPPED_CONFIG_KEYS):
        write_json_atomic(dest / "config.json", {k: v for k, v in raw.items() if k not in DROPPED_CONFIG_KEYS})
    else:
        shutil.copyfile(plan.config_path, dest / "config.json")


def _write_expert(plan: ExpertPlan, dest: Path, layers: dict[str, Any], stats: dict[str, int], progress: bool) -> None:
    from safetensors.torch import save_file

    dest.mkdir()
    _write_config(plan, dest)
    read = Reader()
    by_key = {info.key: name for name, info in plan.kept.items()}
    by_key.update({q.parts["weight"].key: f"{m}.weight" for m, q in plan.quantized.items()})
    parts: list[tuple[Path, list[str]]] = []
    buf: dict[str, Any] = {}
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            path = dest / f".part-{len(parts):05d}.safetensors"
            save_file(buf, str(path), metadata={"format": "pt"})
            parts.append((path, sorted(buf)))
            stats["bytes_out"] += path.stat().st_size
        buf, size = {}, 0

    prog = task = None
    if progress:
        from gpubake.console import step_progress

        prog = step_progress()
        prog.start()
        task = prog.add_task(f"import {dest.name}", total=len(by_key))
    try:
        for f in plan.expert.files:
            stats["bytes_in"] += f.stat().st_size
            keys = sorted(k for k, info in plan.expert.tensors.items() if info.file == f and k in by_key)
            for key in keys:
                name = by_key[key]
                module, _, suffix = name.rpartition(".")
                if name in plan.kept:
                    out = {name: read(plan.kept[name]).contiguous()}
                    stats["kept"] += 1
                else:
                    q = plan.quantized[module]
                    layer = plan.producer.convert(module, q.out_f, q.in_f, lambda s, q=q: read(q.parts[s]),
                                                  lambda s, q=q: q.parts[s].where(), set(q.parts))
                    out = layer.tensors(module)
                    layers[f"{dest.name}/{module}"] = (_layer_stats(layer, q) if isinstance(layer, target.Layer)
                                                       else _fp8_layer_stats(layer, q))
                    stats["quantized"] += 1
                for k, t in out.items():
                    buf[k] = t
                    size += t.numel() * t.element_size()
                if size >= SHARD_BYTES:
                    flush()
                if prog:
                    prog.advance(task)
        flush()
    finally:
        if prog:
            prog.stop()
    _place_shards(dest, parts)


def _place_shards(dest: Path, parts: list[tuple[Path, list[str]]]) -> None:
    if len(parts) == 1:
        os.replace(parts[0][0], dest / layout.SINGLE_FILE)
        return
    wmap, total = {}, 0
    for i, (path, keys) in enumerate(parts):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        total += path.stat().st_size
        os.replace(path, dest / name)
        wmap.update({k: name for k in keys})
    write_json_atomic(dest / layout.INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})


def _layer_stats(layer: target.Layer, q: QLayer) -> dict[str, Any]:
    """What the manifest records of one imported layer (cheap: from codes and scales)."""
    import math

    import torch

    from gpubake.kernels.format import E2M1_VALUES

    mag = torch.maximum(layer.packed & 0x07, (layer.packed >> 4) & 0x07)
    per_block = mag.reshape(q.out_f, q.in_f // target.BLOCK, target.BLOCK // 2).amax(-1)
    scales = layer.block_scale.float()
    nan = torch.isnan(scales)
    lut = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)
    peak = torch.where(nan, torch.zeros(()), lut[per_block.long()] * scales).amax() * layer.global_scale.float()
    out: dict[str, Any] = {
        "shape": [q.out_f, q.in_f],
        "sqnr_db": None,  # no BF16 original to measure against
        "weight_global_scale": float(layer.global_scale),
        "input_global_scale": None if layer.input_scale is None else float(layer.input_scale),
        "amax": float(peak) if math.isfinite(float(peak)) else None,
        "nan_blocks": int(nan.sum()),
        "exact": layer.exact,
    }
    return _with_notes(out, layer)


def _with_notes(out: dict[str, Any], layer: target.Layer | target.FP8Layer) -> dict[str, Any]:
    """A layer's record plus why it is not exact and the source's own values, where it has them."""
    if layer.note:
        out["note"] = layer.note
    if layer.extra:
        out["source_values"] = layer.extra
    return out


def _fp8_layer_stats(layer: target.FP8Layer, q: QLayer) -> dict[str, Any]:
    """What the manifest records of one imported FP8 layer (as `quantize --format fp8` does, and
    the import's own: the scales' range, NaN weights, the unused static activation scale)."""
    import math

    import torch

    w = layer.weight.float()
    nan = torch.isnan(w)
    peak = float((torch.where(nan, torch.zeros(()), w.abs()) * layer.scale).amax())
    out: dict[str, Any] = {
        "shape": [q.out_f, q.in_f],
        "sqnr_db": None,  # no BF16 original to measure against
        "weight_scale_min": float(layer.scale.min()), "weight_scale_max": float(layer.scale.max()),
        "input_scale": layer.input_scale,  # recorded, not used: FP8Linear quantizes activations per token
        "amax": peak if math.isfinite(peak) else None,
        "nan_weights": int(nan.sum()),
        "exact": layer.exact,
    }
    return _with_notes(out, layer)
