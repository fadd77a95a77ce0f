"""NVIDIA ModelOpt's NVFP4 export (e.g. `nvidia/Wan2.2-T2V-A14B-Diffusers-NVFP4`).

Read from nvidia-modelopt 0.47.0 (`modelopt/torch/export/unified_export_hf.py`,
`_export_quantized_weight`; `modelopt/torch/quantization/qtensor/nvfp4_tensor.py`,
`NVFP4QTensor`): diffusers names, and per quantized linear `P`

    P.weight          uint8  [out, in/2]   `(q[..., 1::2] << 4) | q[..., 0::2]`: element 2i low
    P.weight_scale    E4M3   [out, in/16]  row-major (`get_weights_scaling_factor`)
    P.weight_scale_2  fp32   []            amax / (6 * 448) (`get_weights_scaling_factor_2`)
    P.input_scale     fp32   []            optional: calibrated amax / (6 * 448)
                                           (`get_activation_scaling_factor`)

and `NVFP4QTensor.dequantize`: e2m1 * (weight_scale * weight_scale_2). That is gpubake's
layout already: the codes and scales are copied, weight_scale_2 is the global scale and
input_scale the activation scale (both in gpubake's convention). The component's
`config.json` carries `quantization_config` (`quant_method: modelopt`, `quant_algo`);
it is checked, then dropped from the written config (it describes ModelOpt's tensors).
"""

from __future__ import annotations

import json

from gpubake.provisioning.importers.producer import SCALE_DTYPES, Producer, Want, e4m3, scalar, scale_2_and_input_scale
from gpubake.provisioning.importers.source import Expert, SourceError
from gpubake.provisioning.importers.target import Layer

FORMAT = "modelopt"
# NVFP4 weights and activations; NVFP4 weights only. W4A8 (FP8 activations) stores an
# FP8 input_scale and AWQ/SVDQuant extra tensors: not this format.
QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")


def quant_config(expert: Expert) -> tuple[dict | None, str]:
    """(quantization_config, where it was found) from config.json or the safetensors header."""
    if expert.config is not None:
        try:
            cfg = json.loads(expert.config.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SourceError(f"{expert.config}: not valid JSON ({exc})") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict):
            return cfg["quantization_config"], f"{expert.config}: quantization_config"
    raw = expert.metadata.get("quantization_config")
    if raw:
        try:
            q = json.loads(raw)
        except ValueError:
            raise SourceError(f"{expert.files[0]}: header metadata quantization_config is not valid JSON") from None
        if isinstance(q, dict):
            return q, f"{expert.files[0]}: header metadata quantization_config"
    return None, ""


def is_modelopt(expert: Expert) -> bool:
    q, _ = quant_config(expert)
    return bool(q) and (q.get("quant_method") == "modelopt" or (q.get("producer") or {}).get("name") == "modelopt")


class ModelOpt(Producer):
    name = FORMAT

    def prepare(self, expert, names):
        q, where = quant_config(expert)
        if q is None:
            return
        algo = q.get("quant_algo")
        if algo not in QUANT_ALGOS:
            raise SourceError(f"{where}.quant_algo: {algo!r} is not NVFP4 ({', '.join(QUANT_ALGOS)})")
        for name, group in (q.get("config_groups") or {}).items():
            w = (group or {}).get("weights") or {}
            if w.get("group_size", 16) != 16:
                raise SourceError(f"{where}.config_groups.{name}.weights.group_size: {w.get('group_size')!r}, NVFP4 needs 16")

    def wants(self, module, out_f, in_f, present):
        req = {"weight": Want(("uint8",), (out_f, in_f // 2)),
               "weight_scale": Want(SCALE_DTYPES, (out_f, in_f // 16)),
               "weight_scale_2": scalar()}
        return req, {"input_scale": scalar()}

    def codes(self, out_f, in_f, read):
        return read("weight"), e4m3(read("weight_scale")).contiguous()

    def scalars(self, module, read, where, present) -> Layer:
        return Layer(None, None, *scale_2_and_input_scale(read, where, present))
