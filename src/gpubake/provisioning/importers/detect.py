"""Which producer wrote a checkpoint, and in which precision (`--format auto`).

The precision comes from the quantized weights' dtype, whoever wrote them: a uint8
`P.weight` is NVFP4 (two E2M1 codes a byte), a float8_e4m3fn one FP8. An expert holding
both is refused (gpubake's checkpoint is one format). The producer comes from its tensor
names and metadata:

- comfy: a `P.comfy_quant` tensor, `_quantization_metadata` in a safetensors header
  (ComfyUI's two ways of marking a quantized layer), or, for FP8, the legacy `scaled_fp8`
  marker / `P.scale_weight`;
- lightx2v: NVFP4 with `P.alpha`, `P.input_global_scale`, `P.weight_global_scale` or
  `P.input_absmax` (LightX2V's scalars; no other producer uses these names); FP8 with a
  per-row `P.weight_scale` under Wan's original names (LightX2V's converter);
- modelopt: `P.weight_scale_2` with ModelOpt's `quantization_config` (config.json or
  header), or, without a config, `P.weight_scale_2` under diffusers names.

`--format NAME` names the producer; the precision is still read from the dtypes.
"""

from __future__ import annotations

from gpubake.provisioning.importers.comfy import HEADER, MARKER, Comfy
from gpubake.provisioning.importers.comfy_fp8 import LEGACY, LEGACY_SCALE, ComfyFP8
from gpubake.provisioning.importers.lightx2v import ABSMAX, NEW, OLD, LightX2V
from gpubake.provisioning.importers.lightx2v_fp8 import LightX2VFP8
from gpubake.provisioning.importers.modelopt import ModelOpt, is_modelopt
from gpubake.provisioning.importers.producer import FP8_DTYPE, Producer
from gpubake.provisioning.importers.source import Expert, SourceError
from gpubake.provisioning.importers.wan_names import strip_prefix

PRODUCERS: dict[tuple[str, str], type[Producer]] = {
    ("lightx2v", "nvfp4"): LightX2V, ("modelopt", "nvfp4"): ModelOpt, ("comfy", "nvfp4"): Comfy,
    ("lightx2v", "fp8"): LightX2VFP8, ("comfy", "fp8"): ComfyFP8,
}
NAMES = tuple(dict.fromkeys(name for name, _ in PRODUCERS))
FORMATS = ("auto", *NAMES)
PRECISIONS = ("nvfp4", "fp8")
_WEIGHT_DTYPES = {"uint8": "nvfp4", FP8_DTYPE: "fp8"}


def _where(expert: Expert) -> object:
    return expert.files[0] if len(expert.files) == 1 else expert.files[0].parent


def precision(expert: Expert) -> str:
    """nvfp4 or fp8, from the dtypes of the expert's `.weight` tensors (headers read)."""
    found: dict[str, str] = {}
    for info in expert.tensors.values():
        if not info.key.endswith(".weight"):
            continue
        if info.dtype == "float8_e5m2":
            raise SourceError(f"{info.where()}: dtype float8_e5m2; only E4M3 (float8_e4m3fn) FP8 weights can be imported")
        p = _WEIGHT_DTYPES.get(info.dtype)
        if p is not None:
            found.setdefault(p, info.where())
    if len(found) > 1:
        raise SourceError(f"{_where(expert)}: mixes NVFP4 ({found['nvfp4']}: uint8) and FP8 ({found['fp8']}: "
                          "float8_e4m3fn) layers; gpubake's checkpoint is one format")
    if not found:
        raise SourceError(f"{_where(expert)}: no NVFP4 or FP8 tensors (a uint8 or float8_e4m3fn .weight); "
                          "a BF16 checkpoint is baked with `gpubake quantize`")
    return found.popitem()[0]


def detect(expert: Expert, naming: str, prec: str) -> str:
    """The producer of one expert (its headers read), or a one-line SourceError."""
    suffixes = {k.rpartition(".")[2] for k in expert.tensors}
    if MARKER in suffixes or HEADER in expert.metadata:
        return "comfy"
    if prec == "fp8":
        if LEGACY in {strip_prefix(k) for k in expert.tensors} or LEGACY_SCALE in suffixes:
            return "comfy"
        per_row = any(k.endswith(".weight_scale") and len(t.shape) in (1, 2) and t.shape[0] > 1
                      for k, t in expert.tensors.items())
        if per_row and naming == "original":
            return "lightx2v"
        raise SourceError(f"{_where(expert)}: unknown FP8 format (not LightX2V's or ComfyUI's); pass --format if you know it")
    if suffixes & {*NEW, OLD, ABSMAX}:
        return "lightx2v"
    if is_modelopt(expert) or ("weight_scale_2" in suffixes and naming == "diffusers"):
        return "modelopt"
    raise SourceError(f"{_where(expert)}: unknown NVFP4 format (not LightX2V, ModelOpt or ComfyUI); pass --format if you know it")


def producer(name: str, prec: str = "nvfp4") -> Producer:
    if name not in NAMES:
        raise SourceError(f"--format: unknown format {name!r} ({', '.join(FORMATS)})")
    if (name, prec) not in PRODUCERS:
        have = ", ".join(n for n, p in PRODUCERS if p == prec)
        raise SourceError(f"--format {name}: {name}'s {prec.upper()} checkpoints are not supported "
                          f"({prec.upper()} imports: {have})")
    return PRODUCERS[(name, prec)]()
