"""What a Wan 2.2 diffusers checkpoint must look like, checked without loading weights.

Shared by `quantize` (refuses a source that is not Wan-shaped) and the loader (refuses
a missing, extra or mis-shaped tensor), so both name the same key in the same words.
Expected tensor shapes come from building WanTransformer3DModel from the checkpoint's
config on the meta device: no weights are allocated, and a diffusers change to the
architecture is picked up rather than hard-coded here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError

WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
EXPERT_CLASS = ["diffusers", "WanTransformer3DModel"]
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointError(GpubakeError):
    """A checkpoint is not Wan-shaped, or a tensor is missing, extra or mis-shaped."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a diffusers Wan checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def model_index(root: Path) -> dict[str, Any]:
    """model_index.json, checked to describe a Wan pipeline."""
    idx = read_json(root / "model_index.json")
    cls = idx.get("_class_name")
    if cls not in WAN_PIPELINES:
        raise CheckpointError(f"{root / 'model_index.json'}: _class_name {cls!r} is not a Wan pipeline ({', '.join(WAN_PIPELINES)})")
    if not expert_dirs(idx):
        raise CheckpointError(f"{root / 'model_index.json'}: no WanTransformer3DModel component")
    for name, value in idx.items():  # a component is a folder of this checkpoint, never a path out of it
        if isinstance(value, list) and ("/" in name or "\\" in name or name in ("", ".", "..")):
            raise CheckpointError(f"{root / 'model_index.json'}: component {name!r} is not a folder name")
    return idx


def expert_dirs(index: dict[str, Any]) -> list[str]:
    """Components holding a WanTransformer3DModel, in model_index order (transformer first)."""
    return sorted(k for k, v in index.items() if v == EXPERT_CLASS)


def transformer_config(expert: Path) -> dict[str, Any]:
    cfg = read_json(expert / "config.json")
    if cfg.get("_class_name") != "WanTransformer3DModel":
        raise CheckpointError(f"{expert / 'config.json'}: _class_name {cfg.get('_class_name')!r} is not WanTransformer3DModel")
    return cfg


def shard_files(expert: Path) -> list[Path]:
    """The safetensors shards of one expert (sharded index or a single file)."""
    index = expert / INDEX_FILE
    single = expert / SINGLE_FILE
    if index.is_file():
        if single.is_file():  # which one a reader picks must never be a question
            raise CheckpointError(f"{expert}: holds both {SINGLE_FILE} and {INDEX_FILE}; a checkpoint has one or the other")
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index}: no weight_map")
        for n in wmap.values():  # a shard is a file of this directory, never a path out of it
            if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {n!r} is not a file name in {expert}")
        names = sorted(set(wmap.values()))
        for n in names:
            if not (expert / n).is_file():
                raise CheckpointError(f"{expert / n}: shard listed in {INDEX_FILE} is missing")
        return [expert / n for n in names]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{expert}: no {SINGLE_FILE} or {INDEX_FILE}")


def tensor_shapes(shards: list[Path]) -> dict[str, tuple[int, ...]]:
    """{key: shape} of every tensor in the shards, from headers only (no data read)."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    if key in out:
                        raise CheckpointError(f"{shard}: tensor {key!r} also in another shard")
                    out[key] = tuple(f.get_slice(key).get_shape())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError / OSError for bad headers
            raise CheckpointError(f"{shard}: unreadable safetensors ({' '.join(str(exc).split())[:160]})") from None
    return out


def empty_transformer(config: dict[str, Any]) -> Any:
    """WanTransformer3DModel from `config` with parameters on the meta device.

    Buffers stay real (the rotary tables are computed, not stored), so the model is
    usable once parameters are assigned.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights(include_buffers=False):
            return WanTransformer3DModel.from_config(cfg)
    except Exception as exc:
        raise CheckpointError(f"transformer config.json: cannot build WanTransformer3DModel ({exc})") from None


def expected_shapes(model: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({key: shape} of the persistent state, names of nn.Linear modules) of a model."""
    import torch

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return shapes, linears


def quantized_modules(actual: dict[str, tuple[int, ...]]) -> set[str]:
    """Modules stored as NVFP4 in a checkpoint (they have `.weight_packed`, `format.PACKED_KEY`)."""
    from gpubake.kernels.format import PACKED_KEY

    suffix = "." + PACKED_KEY
    return {k[: -len(suffix)] for k in actual if k.endswith(suffix)}


def fp8_modules(actual: dict[str, tuple[int, ...]]) -> set[str]:
    """Modules stored as FP8 weights (`fp8_linear.FP8Linear`): a `.weight_scale` of shape
    [out, 1] and no `.weight_packed`. (An NVFP4 layer of in_features 16 also has a [out, 1]
    `.weight_scale`, its block scales: `.weight_packed` tells them apart.)"""
    from gpubake.kernels.format import PACKED_KEY
    from gpubake.kernels.fp8_linear import FP8_SCALE_KEY

    suffix = "." + FP8_SCALE_KEY
    out = set()
    for key, shape in actual.items():
        module = key[: -len(suffix)]
        if key.endswith(suffix) and len(shape) == 2 and shape[1] == 1 and f"{module}.{PACKED_KEY}" not in actual:
            out.add(module)
    return out


QUANTIZED_FORMATS = ("nvfp4", "fp8")  # the checkpoint formats gpubake quantizes to (a manifest's "format")
# what a manifest's quantization record says of each format's tensors (quantize and import alike)
QUANT_RECORDS = {
    "nvfp4": {"block_size": 16, "scale_dtype": "float8_e4m3fn", "scale_layout": "row-major"},
    "fp8": {"weight_dtype": "float8_e4m3fn", "scale_dtype": "float32", "scale_layout": "per-output-row [out, 1]"},
}


def stored_format(actual: dict[str, tuple[int, ...]]) -> str | None:
    """The quantized format an expert's tensors are stored in ("nvfp4", "fp8"), None: none
    quantized (from the keys and shapes alone: `quantized_modules`, `fp8_modules`)."""
    if quantized_modules(actual):
        return "nvfp4"
    if fp8_modules(actual):
        return "fp8"
    return None


def static_scale_modules(actual: dict[str, tuple[int, ...]]) -> set[str]:
    """Modules whose checkpoint holds the optional static activation scale
    (`.input_global_scale`, `format.INPUT_GLOBAL_SCALE_KEY`: published W4A4 checkpoints)."""
    from gpubake.kernels.format import INPUT_GLOBAL_SCALE_KEY

    suffix = "." + INPUT_GLOBAL_SCALE_KEY
    return {k[: -len(suffix)] for k in actual if k.endswith(suffix)}


def check_tensors(actual: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """One line naming the first missing, extra or mis-shaped key."""
    for key in sorted(expected):
        if key not in actual:
            raise CheckpointError(f"{where}: missing tensor {key!r} (expected shape {list(expected[key])})")
    for key in sorted(actual):
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {key!r} (not in WanTransformer3DModel)")
        if tuple(actual[key]) != tuple(expected[key]):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(actual[key])}, expected {list(expected[key])}")
