"""ComfyUI's NVFP4 checkpoints (comfy-kitchen's layout; e.g. `Kijai/WanVideo_comfy_nvfp4`).

Read from ComfyUI (`comfy/ops.py`, `mixed_precision_ops`: `Linear._load_from_state_dict`
and `Linear.state_dict`) and comfy-kitchen 0.2.40 (`comfy_kitchen/tensor/nvfp4.py`,
`TensorCoreNVFP4Layout`; `comfy_kitchen/backends/eager/quantization.py`,
`quantize_nvfp4` / `dequantize_nvfp4`). Wan's original names (ComfyUI's own Wan model),
sometimes under `model.diffusion_model.`, and per quantized linear `P`

    P.weight          uint8 [out, in/2]   `pack_uint4(..., hi_first=True)`: element 2i HIGH
    P.weight_scale    E4M3  swizzled      `to_blocked(...)`: [pad128(out), pad4(in/16)]
    P.weight_scale_2  fp32  []            amax / (448 * 6), the per-tensor scale
    P.input_scale     fp32  []            optional: `QuantizedTensor.from_float(input, scale=input_scale)`
    P.comfy_quant     uint8 [n]           the UTF-8 JSON {"format": "nvfp4", ...}

(older files list the layers in the header's `_quantization_metadata` instead of
`comfy_quant` tensors). `dequantize_nvfp4`: e2m1 * (per_tensor_scale * block_scale),
scales unswizzled by `from_blocked`. gpubake's layout differs only in the nibble order
(swapped here) and the scale layout (unswizzled here); the scales are the same numbers.
comfy-kitchen pads a [out, in] weight to multiples of 16; Wan's are multiples already,
so a padded layer is refused as mis-shaped.
"""

from __future__ import annotations

import json
from typing import Any

from gpubake.provisioning.importers.producer import (
    SCALE_DTYPES,
    Producer,
    Want,
    scalar,
    scale_2_and_input_scale,
    swizzled_shape,
    unswizzle,
)
from gpubake.provisioning.importers.source import SourceError
from gpubake.provisioning.importers.target import Layer
from gpubake.provisioning.importers.wan_names import normalize

FORMAT = "comfy"
MARKER = "comfy_quant"
HEADER = "_quantization_metadata"


def swap_nibbles(t: Any) -> Any:
    """High-nibble-first bytes -> low-nibble-first (and back: it is an involution)."""
    return ((t & 0x0F) << 4) | (t >> 4)


def parse_marker(t: Any, where: str) -> dict[str, Any]:
    try:
        conf = json.loads(bytes(t.reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{where}: not UTF-8 JSON") from None
    if isinstance(conf, str):  # some writers encoded the JSON twice
        try:
            conf = json.loads(conf)
        except ValueError:
            raise SourceError(f"{where}: not a JSON object") from None
    if not isinstance(conf, dict):
        raise SourceError(f"{where}: not a JSON object")
    return conf


class Comfy(Producer):
    name = FORMAT

    def __init__(self) -> None:
        self.header_layers: dict[str, dict[str, Any]] = {}
        self.header_where = ""

    def prepare(self, expert, names):
        """Layers named in the header's `_quantization_metadata`, by diffusers name."""
        self.header_layers = {}
        raw = expert.metadata.get(HEADER)
        if not raw:
            return
        self.header_where = f"{expert.files[0]}: header metadata {HEADER}"
        try:
            layers = json.loads(raw).get("layers") or {}
        except (ValueError, AttributeError):
            raise SourceError(f"{self.header_where}: not a JSON object with 'layers'") from None
        if layers:
            mapped = normalize([f"{k}.weight" for k in layers])
            for name, key in mapped.items():
                conf = layers[key[: -len(".weight")]]
                self.header_layers[name[: -len(".weight")]] = conf if isinstance(conf, dict) else {"format": conf}

    def wants(self, module, out_f, in_f, present):
        req = {"weight": Want(("uint8",), (out_f, in_f // 2)),
               "weight_scale": Want(SCALE_DTYPES, swizzled_shape(out_f, in_f)),
               "weight_scale_2": scalar()}
        opt = {"input_scale": scalar()}
        marker = Want(("uint8",), None, vector=True)
        (opt if module in self.header_layers else req)[MARKER] = marker
        return req, opt

    def is_quantized(self, module, parts):
        return MARKER in parts or module in self.header_layers or super().is_quantized(module, parts)

    def codes(self, out_f, in_f, read):
        return swap_nibbles(read("weight")), unswizzle(read("weight_scale"), out_f, in_f)

    def scalars(self, module, read, where, present) -> Layer:
        if MARKER in present:
            conf, at = parse_marker(read(MARKER), where(MARKER)), where(MARKER)
        else:
            conf, at = self.header_layers[module], f"{self.header_where}: layers"
        if conf.get("format") != "nvfp4":
            raise SourceError(f"{at}: format {conf.get('format')!r}; only nvfp4 layers can be imported")
        g, inp = scale_2_and_input_scale(read, where, present)
        return Layer(None, None, g, inp, extra={k: v for k, v in conf.items() if k != "format"})
