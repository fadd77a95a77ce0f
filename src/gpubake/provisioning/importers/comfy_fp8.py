"""ComfyUI's FP8 checkpoints (e.g. Comfy-Org's `wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors`).

Two layouts, both with Wan's original names (sometimes under `model.diffusion_model.`)
and one per-tensor scale per quantized linear `P`:

- comfy-kitchen's (ComfyUI `comfy/ops.py`, `mixed_precision_ops`: `Linear._load_from_state_dict`
  reads `P.comfy_quant`, for `float8_e4m3fn` the scale `P.weight_scale`, then the format's
  other `parameters`, `input_scale` (`comfy/quant_ops.py` `QUANT_ALGOS`); `Linear.state_dict`
  writes them back; comfy-kitchen 0.2.40 `comfy_kitchen/tensor/fp8.py`,
  `TensorCoreFP8Layout.state_dict_tensors`: {"": qdata, "_scale": scale})::

      P.weight        float8_e4m3fn  [out, in]  quantize_per_tensor_fp8: clamp(w * (1 / scale), +-448)
      P.weight_scale  float32        []         amax(|w|) / 448
      P.input_scale   float32        []         optional: the static activation scale
      P.comfy_quant   uint8          [n]        UTF-8 JSON {"format": "float8_e4m3fn", ...}

  or, in older files, the layers listed in the header's `_quantization_metadata`;
- the legacy "scaled fp8" files (ComfyUI `comfy/utils.py`, `convert_old_quants`, which
  rewrites them into the first layout on load): a `scaled_fp8` marker tensor (two
  elements: `full_precision_matrix_mult`), `P.scale_weight` for `P.weight_scale` and
  `P.scale_input` for `P.input_scale` (dropped there when it is 1.0). LightX2V's
  `--comfyui_mode` writes this layout too (`lightx2v_fp8.py`). A `scale_weight` beside a
  BF16 weight (a no-op some writers leave) must be 1.0 and is dropped.

Dequantization (`TensorCoreFP8Layout.dequantize` -> `dequantize_per_tensor_fp8`:
`qdata.to(dtype) * scale.to(dtype)`; `Params` keeps the scale in float32): W = weight *
scale. gpubake's per-row scale is that float32 value in every row: exact. An
`input_scale` is recorded in the manifest, not stored: gpubake's FP8Linear quantizes
activations per token.
"""

from __future__ import annotations

from typing import Any

from gpubake.provisioning.importers.comfy import MARKER, Comfy, parse_marker
from gpubake.provisioning.importers.producer import FP8_DTYPE, Want, check_scale, scalar, value
from gpubake.provisioning.importers.source import SourceError
from gpubake.provisioning.importers.target import FP8Layer

FORMAT = "comfy"
LEGACY = "scaled_fp8"
LEGACY_SCALE, LEGACY_INPUT = "scale_weight", "scale_input"
QUANT_FORMAT = "float8_e4m3fn"


class ComfyFP8(Comfy):
    name = FORMAT
    precision = "fp8"
    markers = (LEGACY,)

    def __init__(self) -> None:
        super().__init__()
        self.legacy: dict[str, Any] | None = None  # the scaled_fp8 marker's meaning, when present

    def prepare(self, expert, names):
        super().prepare(expert, names)
        self.legacy = None
        if LEGACY in names:
            info = expert.tensors[names[LEGACY]]
            self.legacy = {"layout": LEGACY, "full_precision_matrix_mult": info.shape == (2,)}

    def is_quantized(self, module, parts):
        if self.legacy is not None:
            w = parts.get("weight")
            return w is not None and w.dtype == FP8_DTYPE
        return MARKER in parts or module in self.header_layers or (
            "weight" in parts and parts["weight"].dtype == FP8_DTYPE)

    def dummy(self, module, suffix):
        return self.legacy is not None and suffix in (LEGACY_SCALE, LEGACY_INPUT)

    def wants(self, module, out_f, in_f, present):
        weight = Want((FP8_DTYPE,), (out_f, in_f))
        if self.legacy is not None:
            return {"weight": weight, LEGACY_SCALE: scalar()}, {LEGACY_INPUT: scalar()}
        req = {"weight": weight, "weight_scale": scalar()}
        marker = Want(("uint8",), None, vector=True)
        opt = {"input_scale": scalar()}
        (opt if module in self.header_layers else req)[MARKER] = marker
        return req, opt

    def scalars(self, module, read, where, present) -> FP8Layer:
        if self.legacy is not None:
            scale_key, input_key, extra = LEGACY_SCALE, LEGACY_INPUT, dict(self.legacy)
        else:
            if MARKER in present:
                conf, at = parse_marker(read(MARKER), where(MARKER)), where(MARKER)
            else:
                conf, at = self.header_layers[module], f"{self.header_where}: layers"
            if conf.get("format") != QUANT_FORMAT:
                raise SourceError(f"{at}: format {conf.get('format')!r}; an FP8 checkpoint's layers must be "
                                  f"{QUANT_FORMAT}")
            scale_key, input_key, extra = "weight_scale", "input_scale", {k: v for k, v in conf.items() if k != "format"}
        s = value(read(scale_key))
        check_scale(s, where(scale_key))
        inp = None
        if input_key in present:
            i = value(read(input_key))
            check_scale(i, where(input_key))
            if not (self.legacy is not None and float(i) == 1.0):  # convert_old_quants drops a scale_input of 1.0
                inp = float(i)
        return FP8Layer(None, s, inp, extra={**extra, "weight_scale": float(s)})

    def convert(self, module, out_f, in_f, read, where, present) -> FP8Layer:
        layer = self.scalars(module, read, where, present)
        layer.weight = read("weight")
        layer.scale = layer.scale.reshape(1, 1).expand(out_f, 1).contiguous()  # the float32 per-tensor scale in every row
        return layer
