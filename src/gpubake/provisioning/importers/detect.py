"""Which producer wrote a checkpoint, from its tensor names and metadata (`--format auto`).

- comfy: a `P.comfy_quant` tensor, or `_quantization_metadata` in a safetensors header
  (ComfyUI's two ways of marking a quantized layer);
- lightx2v: `P.alpha`, `P.input_global_scale`, `P.weight_global_scale` or
  `P.input_absmax` (LightX2V's scalars; no other producer uses these names);
- modelopt: `P.weight_scale_2` with ModelOpt's `quantization_config` (config.json or
  header), or, without a config, `P.weight_scale_2` under diffusers names.
"""

from __future__ import annotations

from gpubake.provisioning.importers.comfy import HEADER, MARKER, Comfy
from gpubake.provisioning.importers.lightx2v import ABSMAX, NEW, OLD, LightX2V
from gpubake.provisioning.importers.modelopt import ModelOpt, is_modelopt
from gpubake.provisioning.importers.producer import Producer
from gpubake.provisioning.importers.source import Expert, SourceError

PRODUCERS: dict[str, type[Producer]] = {"lightx2v": LightX2V, "modelopt": ModelOpt, "comfy": Comfy}
FORMATS = ("auto", *PRODUCERS)


def detect(expert: Expert, naming: str) -> str:
    """The producer of one expert (its headers read), or a one-line SourceError."""
    suffixes = {k.rpartition(".")[2] for k in expert.tensors}
    if MARKER in suffixes or HEADER in expert.metadata:
        return "comfy"
    if suffixes & {*NEW, OLD, ABSMAX}:
        return "lightx2v"
    if is_modelopt(expert) or ("weight_scale_2" in suffixes and naming == "diffusers"):
        return "modelopt"
    where = expert.files[0] if len(expert.files) == 1 else expert.files[0].parent
    if not any(t.dtype == "uint8" and t.key.endswith(".weight") for t in expert.tensors.values()):
        raise SourceError(f"{where}: no NVFP4 tensors (a uint8 .weight); a BF16 checkpoint is baked with `gpubake quantize`")
    raise SourceError(f"{where}: unknown NVFP4 format (not LightX2V, ModelOpt or ComfyUI); pass --format if you know it")


def producer(name: str) -> Producer:
    if name not in PRODUCERS:
        raise SourceError(f"--format: unknown format {name!r} ({', '.join(FORMATS)})")
    return PRODUCERS[name]()
