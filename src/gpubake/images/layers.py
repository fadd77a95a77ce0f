"""The weights as several image layers: which files go in which layer, and what a build will cost.

Why several: one ~27 GiB weight layer is over GHCR's documented 10 GB per-layer limit and
pulls as one stream. Here every layer holds at most `LAYER_LIMIT` bytes (4 GB): the shards
of one component, grouped in name order; the text encoder and the VAE get layers of their
own (their bytes are copied from the source and change only with its revision), then each
expert's shards (they change with the quantizer), then one small `meta` layer (configs,
tokenizer, scheduler, model_index.json and the manifest, which changes with any weight).
Everything comes before gpubake's code, so a code-only change re-pushes no weights.

A layer is a folder `model/<layer name>/` of the build context holding its part of the
checkpoint tree (hard links into the model cache); the Containerfile COPYs each folder onto
`<prefix>/model/`, in order. The plan comes from the checkpoint's manifest when the
weights exist (`plan_checkpoint`), else from the size table `images/data/weights.json`
(`estimate`: what `build-image --dry-run --json` prints before anything is fetched). A
context rendered from an estimate is filled by `assign`: each component's files are split
into as many layers as the plan gave it (contiguous in name order, the largest layer as
small as it can be).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from gpubake.errors import BuildError
from gpubake.images.spec import QUANTIZED
from gpubake.provisioning.bake import MANIFEST_NAME, read_manifest

__all__ = [
    "LAYER_LIMIT", "META", "WeightLayer", "assign", "component_bytes", "component_of", "estimate", "estimated_layers", "plan_checkpoint",
    "plan_files", "size_table", "stage",
]

LAYER_LIMIT = 4_000_000_000  # bytes of one weight layer (GHCR's limit is 10 GB; smaller layers pull in parallel)
META = "meta"  # the component of every small file (configs, tokenizer, scheduler, indexes, the manifest)
ALL = "all"  # one layer for everything: a model without a size table, planned before its files exist
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DATA_FILE = Path(__file__).parent / "data" / "weights.json"


@dataclass(frozen=True)
class WeightLayer:
    """One weight layer: its name (the context folder), component, bytes and files."""

    name: str  # e.g. "02-transformer-1": folder under the context's model/
    component: str  # "text_encoder", "vae", "transformer", ..., or META / ALL
    bytes: int  # exact when `files` is set, else the estimate
    files: tuple[str, ...] = ()  # checkpoint-relative paths, in name order
    source: str = ""  # where the bytes come from, in words
    estimated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "component": self.component, "bytes": self.bytes,
                               "estimated": self.estimated, "source": self.source}
        if self.files:
            out["files"] = list(self.files)
        if self.bytes > LAYER_LIMIT:
            out["over_limit"] = True  # a single file larger than the limit: it cannot be split
        return out


def component_of(rel: str) -> str:
    """The component of a checkpoint-relative path: its top folder for weight files, else META."""
    top, sep, _ = rel.partition("/")
    return top if sep and rel.endswith(WEIGHT_SUFFIXES) else META


def _is_expert(component: str) -> bool:
    return component.startswith("transformer")


def _order(components: Iterable[str]) -> list[str]:
    """Copied components first (text encoder, VAE ...), then the experts, META last."""
    names = set(components)
    copied = sorted(c for c in names if c not in (META, ALL) and not _is_expert(c))
    experts = sorted(c for c in names if _is_expert(c))
    return copied + experts + [c for c in (ALL, META) if c in names]


def _next_fit(files: list[tuple[str, int]], capacity: int) -> list[list[tuple[str, int]]]:
    """Contiguous groups, each filled until the next file would pass `capacity`."""
    groups: list[list[tuple[str, int]]] = []
    used = 0
    for item in files:
        if not groups or (used + item[1] > capacity and groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += item[1]
    return groups


def _split(files: list[tuple[str, int]], parts: int) -> list[list[tuple[str, int]]]:
    """`files` in exactly `parts` contiguous groups (empty ones at the end), largest as small as it can be."""
    if not files:
        return [[] for _ in range(parts)]
    lo, hi = max(size for _, size in files), sum(size for _, size in files)
    while lo < hi:  # the smallest capacity with which next-fit needs at most `parts` groups
        mid = (lo + hi) // 2
        if len(_next_fit(files, mid)) <= parts:
            hi = mid
        else:
            lo = mid + 1
    groups = _next_fit(files, lo)
    return groups + [[] for _ in range(parts - len(groups))]


def _name(index: int, component: str, part: int, parts: int) -> str:
    return f"{index:02d}-{component}" + (f"-{part}" if parts > 1 else "")


def _layers(per_component: dict[str, list[list[tuple[str, int]]]], *, sources: Mapping[str, str],
            estimated: bool) -> list[WeightLayer]:
    out: list[WeightLayer] = []
    for component in _order(per_component):
        groups = per_component[component]
        for part, group in enumerate(groups, 1):
            out.append(WeightLayer(
                name=_name(len(out), component, part, len(groups)),
                component=component,
                bytes=sum(size for _, size in group),
                files=() if estimated else tuple(rel for rel, _ in group),
                source=sources.get(component, ""),
                estimated=estimated,
            ))
    return out


_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # it names a context folder and a Containerfile line


def _by_component(sizes: Mapping[str, int]) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for rel in sorted(sizes):
        component = component_of(rel)
        if not _COMPONENT.match(component):
            raise BuildError(f"weights: {rel}: folder name {component!r} is not a plain name ([A-Za-z0-9_.-])")
        out.setdefault(component, []).append((rel, int(sizes[rel])))
    return out


def plan_files(sizes: Mapping[str, int], *, limit: int = LAYER_LIMIT, sources: Mapping[str, str] | None = None,
               estimated: bool = False) -> list[WeightLayer]:
    """The layers of a checkpoint whose files are `{relative path: bytes}`: each component's
    files in name order, in as few layers of at most `limit` bytes as contiguous groups
    allow (a file over the limit alone), balanced so that the largest is as small as it can be."""
    groups = {c: _split(files, len(_next_fit(files, limit))) for c, files in _by_component(sizes).items()}
    return _layers(groups, sources=sources or {}, estimated=estimated)


def checkpoint_sizes(root: Path) -> dict[str, int]:
    """{relative path: bytes} of a checkpoint: the files its manifest lists, and the manifest."""
    manifest = read_manifest(root)
    sizes = {rel: int(entry["size"]) for rel, entry in manifest["files"].items()}
    sizes[MANIFEST_NAME] = (root / MANIFEST_NAME).stat().st_size
    return sizes


def plan_checkpoint(root: Path, *, sources: Mapping[str, str] | None = None) -> list[WeightLayer]:
    """The layers of the checkpoint at `root`, exact (from its manifest)."""
    return plan_files(checkpoint_sizes(root), sources=sources)


def assign(planned: list[WeightLayer], sizes: Mapping[str, int]) -> list[WeightLayer]:
    """The files of a checkpoint in the layers a context was rendered with (`planned`).

    Each component gets the number of layers the plan gave it; its files are split into
    them contiguously. A component the plan does not know, or a layer over the limit when
    the plan said it would not be, is a one-line `BuildError`: render the context again
    from the checkpoint (the plan then comes from its files).
    """
    counts: dict[str, int] = {}
    for layer in planned:
        counts[layer.component] = counts.get(layer.component, 0) + 1
    files = _by_component(sizes)
    if ALL in counts:
        files = {ALL: sorted(((rel, int(size)) for rel, size in sizes.items()), key=lambda item: item[0])}
    unknown = sorted(set(files) - set(counts))
    if unknown:
        raise BuildError(f"weights: the checkpoint has {', '.join(unknown)}, which the context's layer plan lacks; render it again")
    groups = {c: _split(files.get(c, []), n) for c, n in counts.items()}
    out: list[WeightLayer] = []
    by_name = iter(planned)
    for component in _order(groups):
        for group in groups[component]:
            layer = next(by_name)
            size = sum(s for _, s in group)
            if size > LAYER_LIMIT and len(group) > 1 and layer.component != ALL:
                raise BuildError(f"weights: layer {layer.name} would hold {size / 1e9:.1f} GB (> {LAYER_LIMIT / 1e9:.0f} GB): "
                                 "the plan it was rendered with underestimated it; render the context again")
            out.append(WeightLayer(name=layer.name, component=component, bytes=size, files=tuple(rel for rel, _ in group),
                                   source=layer.source))
    return out


def stage(checkpoint: Path, layers: list[WeightLayer], model_dir: Path) -> None:
    """Hard-link (or copy, across file systems) each layer's files into `model_dir/<layer>/`;
    every layer gets its folder, an empty one too (its COPY then adds no file)."""
    if model_dir.exists():
        raise BuildError(f"{model_dir}: already exists; render a fresh context")
    listed = sorted(rel for layer in layers for rel in layer.files)
    if len(listed) != len(set(listed)):
        raise BuildError("weights: a file is planned in two layers")
    for layer in layers:
        folder = model_dir / layer.name
        folder.mkdir(parents=True)
        for rel in layer.files:
            src, dest = checkpoint / rel, folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)


# ---------------------------------------------------------------------------- estimates


@cache
def size_table() -> dict[str, Any]:
    """`images/data/weights.json`: per model id, each component's bytes (see its `_doc`)."""
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def component_sources(spec: Any) -> dict[str, str]:
    m = spec.model
    origin = "generated (make_tiny, seed 0)" if m.source == "generate:tiny" else m.source
    table = size_table()["models"].get(m.id, {}).get("components", {})
    out = {META: f"{origin}: configs, tokenizer, scheduler; gpubake-manifest.json"}
    for name, comp in table.items():
        how = (f"quantized to {QUANTIZED[m.quantization]} ({m.policy})" if comp["kind"] == "expert" and m.quantization in QUANTIZED
               else "as stored")
        out[name] = f"{origin}: {name}/ {how}"
    return out


def component_bytes(comp: Mapping[str, Any], quantization: str) -> int:
    """A component's bytes in the image: an expert in the spec's quantized format (`<format>_bytes`
    of the size table), anything else (and a BF16 image's experts) as the source stores it."""
    if comp["kind"] == "expert" and quantization in QUANTIZED:
        return int(comp[f"{quantization}_bytes"])
    return int(comp["source_bytes"])


def _estimated_sizes(spec: Any) -> dict[str, int] | None:
    """Stand-in files of the checkpoint the spec will bake, from the size table (None: unknown model)."""
    entry = size_table()["models"].get(spec.model.id)
    if entry is None:
        return None
    sizes: dict[str, int] = {}
    for name, comp in entry["components"].items():
        total = component_bytes(comp, spec.model.quantization)
        shards = max(1, int(comp["shards"]))
        for i in range(shards):
            sizes[f"{name}/shard-{i + 1:05d}-of-{shards:05d}.safetensors"] = total // shards + (1 if i < total % shards else 0)
    sizes["model_index.json"] = int(entry["meta_bytes"])
    return sizes


def estimated_layers(spec: Any) -> list[WeightLayer]:
    """The layer plan before the weights exist: from the size table, or one layer for everything."""
    sizes = _estimated_sizes(spec)
    if sizes is None:
        return [WeightLayer(name="00-weights", component=ALL, bytes=0, source=spec.model.source, estimated=True)]
    return plan_files(sizes, sources=component_sources(spec), estimated=True)


def _gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (cheap: no torch import; quantize asks torch itself)."""
    return Path("/dev/nvidia0").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Estimate:
    """What baking the spec's weights will take, before anything starts (`build-image --dry-run`)."""

    layers: list[WeightLayer]
    download_bytes: int | None
    disk_bytes: dict[str, int] | None
    ram_bytes: int | None
    seconds: dict[str, float] | None
    quantize: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "layer_limit_bytes": LAYER_LIMIT,
            "image_weight_bytes": sum(layer.bytes for layer in self.layers),
            "download_bytes": self.download_bytes,
            "disk_bytes": self.disk_bytes,
            "ram_bytes": self.ram_bytes,
            "seconds": self.seconds,
            "quantize": self.quantize,
            "notes": self.notes,
        }


def estimate(spec: Any, *, cached: Path | None = None, gpu: bool | None = None, cores: int | None = None) -> Estimate:
    """The weight layers, download, disk, RAM and time of baking `spec`'s model.

    `cached`: the checkpoint already in the model cache (then the layers are exact and
    nothing is fetched or quantized). `gpu`/`cores` default to this machine's.
    """
    m = spec.model
    if m.at == "boot":
        return Estimate(layers=[], download_bytes=0, disk_bytes={"total": 0}, ram_bytes=0, seconds={"total": 0.0},
                        notes=["model.at = boot: the image holds no weights; start.sh fetches them into the volume at boot"])
    if cached is not None:
        layers = plan_checkpoint(cached, sources=component_sources(spec))
        weights = sum(layer.bytes for layer in layers)
        return Estimate(layers=layers, download_bytes=0, disk_bytes={"store_and_archive": 2 * weights, "total": 2 * weights},
                        ram_bytes=0, seconds={"total": round(weights / size_table()["rates"]["layer_bytes_per_s"], 1)},
                        notes=[f"the checkpoint is in the model cache ({cached}): nothing to fetch or quantize"])
    layers = estimated_layers(spec)
    entry = size_table()["models"].get(m.id)
    if entry is None:
        return Estimate(layers=layers, download_bytes=None, disk_bytes=None, ram_bytes=None, seconds=None,
                        notes=[f"no size table for model {m.id!r} (images/data/weights.json): one weight layer, sizes unknown"])
    rates = size_table()["rates"]
    gpu = _gpu_present() if gpu is None else gpu
    cores = cpu_cores() if cores is None else cores
    comps = entry["components"].values()
    generated = bool(entry.get("generated"))
    source_bytes = sum(c["source_bytes"] for c in comps) + int(entry["meta_bytes"])
    download = 0 if generated else source_bytes
    experts = [c for c in comps if c["kind"] == "expert"]
    quantizing = m.quantization in QUANTIZED
    params = sum(c["quantized_params"] for c in experts) if quantizing else 0
    rate = rates["quantize_params_per_s_gpu"] if gpu else rates["quantize_params_per_s_per_cpu_core"] * cores
    weights = sum(layer.bytes for layer in layers)
    largest_shard = max((c["source_bytes"] // max(1, c["shards"]) for c in comps), default=0)
    seconds = {
        "download": round(download / rates["download_bytes_per_s"], 1),
        "verify": round(download / rates["hash_bytes_per_s"], 1),
        "quantize": round(params / rate, 1),
        "layers": round(weights / rates["layer_bytes_per_s"], 1),
    }
    seconds["total"] = round(sum(seconds.values()), 1)
    disk = {"download": download if quantizing else 0, "model_cache": weights, "store_and_archive": 2 * weights}
    disk["total"] = sum(disk.values())
    notes = ["estimated from images/data/weights.json; the build plans from the real files",
             "disk excludes the Python environment (~6-8 GB per store for the CUDA wheels) and, where the store "
             "falls back to the vfs driver (no overlay mount), one full copy of the tree per layer"]
    return Estimate(
        layers=layers,
        download_bytes=download,
        disk_bytes=disk,
        ram_bytes=(largest_shard + 2_000_000_000) if quantizing and params else 1_000_000_000,
        seconds=seconds,
        quantize={"device": "cuda" if gpu else "cpu", "cpu_cores": None if gpu else cores, "params": params,
                  "params_per_s": rate} if quantizing else {},
        notes=notes,
    )
