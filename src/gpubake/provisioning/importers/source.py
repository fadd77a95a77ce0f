"""Where a source's experts are, and what their safetensors headers say (no data read).

Layouts accepted (each expert a single file or shards):

- diffusers: `model_index.json` + one folder per WanTransformer3DModel component
  (`transformer/`, `transformer_2/`), as ModelOpt exports a pipeline;
- Wan's original A14B folders `high_noise_model/` and `low_noise_model/`;
- files side by side, the high-noise expert's name containing `high` and the
  low-noise one's `low` (LightX2V's `high_nvfp4.safetensors`, ComfyUI's
  `..._HIGH_nvfp4.safetensors`), shards of one expert sharing the word;
- one file, or one folder of shards: a single-expert model.

diffusers' WanPipeline runs `transformer` for the high-noise steps and `transformer_2`
for the low-noise ones, so high -> transformer and low -> transformer_2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.provisioning import layout

HIGH, LOW = "transformer", "transformer_2"
_WORD = {"high": HIGH, "low": LOW}
_DTYPES = {"U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F16": "float16", "BF16": "bfloat16",
           "F32": "float32", "F64": "float64"}


class SourceError(GpubakeError):
    """A source that cannot be imported: layout, file, key, shape, dtype or value."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str                   # the key as stored in `file`
    dtype: str                 # torch dtype name (uint8, float8_e4m3fn, bfloat16, ...)
    shape: tuple[int, ...]

    def where(self) -> str:
        return f"{self.file}: {self.key}"


@dataclass
class Expert:
    name: str                  # diffusers component: transformer | transformer_2
    files: list[Path]
    config: Path | None = None  # config.json beside the shards (diffusers layout)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # source key -> info
    metadata: dict[str, str] = field(default_factory=dict)         # safetensors header metadata, merged


@dataclass
class Source:
    root: Path
    layout: str                          # diffusers | original-folders | files | single
    experts: dict[str, Expert]
    model_index: dict[str, Any] | None = None  # diffusers layout only


def _shards_of_dir(d: Path) -> list[Path]:
    idx = sorted(d.glob("*.safetensors.index.json"))
    if len(idx) > 1:
        raise SourceError(f"{d}: more than one *.safetensors.index.json ({idx[0].name}, {idx[1].name})")
    if idx:
        wmap = layout.read_json(idx[0]).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise SourceError(f"{idx[0]}: no weight_map")
        files = [d / n for n in sorted(set(wmap.values()))]
        for f in files:
            if not f.is_file():
                raise SourceError(f"{f}: shard listed in {idx[0].name} is missing")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{d}: no .safetensors files")
    return files


def discover(root: Path) -> Source:
    """The experts of `root` (a folder or one .safetensors file)."""
    if root.is_file():
        if root.suffix != ".safetensors":
            raise SourceError(f"{root}: not a .safetensors file or a folder")
        return Source(root, "single", {HIGH: Expert(HIGH, [root])})
    if not root.is_dir():
        raise SourceError(f"{root}: no such file or folder")
    if (root / "model_index.json").is_file():
        index = layout.model_index(root)
        experts = {}
        for e in layout.expert_dirs(index):
            cfg = root / e / "config.json"
            experts[e] = Expert(e, _shards_of_dir(root / e), cfg if cfg.is_file() else None)
        return Source(root, "diffusers", experts, index)
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        experts = {}
        for word, name in (("high", HIGH), ("low", LOW)):
            d = root / f"{word}_noise_model"
            if not d.is_dir():
                raise SourceError(f"{d}: missing (Wan 2.2 A14B has a high- and a low-noise expert)")
            experts[name] = Expert(name, _shards_of_dir(d))
        return Source(root, "original-folders", experts)
    files = _shards_of_dir(root)
    if len(files) == 1 or any(p.name.endswith(".safetensors.index.json") for p in root.iterdir()):
        return Source(root, "single", {HIGH: Expert(HIGH, files)})
    groups: dict[str, list[Path]] = {HIGH: [], LOW: []}
    for f in files:
        words = {w for w in _WORD if re.search(rf"(^|[^a-z]){w}([^a-z]|$)", f.stem.lower())}
        if len(words) != 1:
            raise SourceError(f"{f}: cannot tell which expert this file holds (its name should contain 'high' or 'low')")
        groups[_WORD[words.pop()]].append(f)
    for name, fs in groups.items():
        if not fs:
            raise SourceError(f"{root}: no file of the {'high' if name == HIGH else 'low'}-noise expert (names need 'high'/'low')")
    return Source(root, "files", {n: Expert(n, fs) for n, fs in groups.items()})


def read_headers(expert: Expert) -> None:
    """Fill `expert.tensors` and `.metadata` from the safetensors headers."""
    from safetensors import safe_open

    for f in expert.files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k, v in (sf.metadata() or {}).items():
                    expert.metadata.setdefault(k, v)
                for key in sf.keys():
                    if key in expert.tensors:
                        raise SourceError(f"{f}: {key}: also stored in {expert.tensors[key].file.name}")
                    sl = sf.get_slice(key)
                    dt = _DTYPES.get(sl.get_dtype(), sl.get_dtype())
                    expert.tensors[key] = TensorInfo(f, key, dt, tuple(sl.get_shape()))
        except SourceError:
            raise
        except Exception as exc:  # SafetensorError / OSError for a bad header
            raise SourceError(f"{f}: unreadable safetensors ({' '.join(str(exc).split())[:160]})") from None
    _check_index(expert)


def _check_index(expert: Expert) -> None:
    """A sharded expert's index must name, for every key, the shard that holds it."""
    dirs = {f.parent for f in expert.files}
    for d in dirs:
        for idx in d.glob("*.safetensors.index.json"):
            wmap = layout.read_json(idx).get("weight_map") or {}
            for key, shard in wmap.items():
                info = expert.tensors.get(key)
                if info is None:
                    raise SourceError(f"{idx}: {key}: listed in the weight_map but in no shard")
                if info.file.name != shard:
                    raise SourceError(f"{idx}: {key}: weight_map says {shard}, found in {info.file.name}")
            for key, info in expert.tensors.items():
                if info.file.parent == d and key not in wmap:
                    raise SourceError(f"{info.file}: {key}: not in {idx.name}'s weight_map")

