"""gpubake's quantized layers, as the loader reads them: NVFP4 (`kernels/format.py`,
`kernels/linear.py`) and FP8 (`kernels/fp8_linear.py`).

Per NVFP4 linear `P` of a WanTransformer3DModel:

    P.weight_packed        uint8          [out, in/2]   element 2i in the low nibble
    P.weight_scale         float8_e4m3fn  [out, in/16]  row-major
    P.weight_global_scale  float32        []            value = e2m1 * scale * global
    P.input_global_scale   float32        []            optional: the static activation
                                                        scale, same convention (amax / 2688)
    P.bias                 as stored      [out]

Per FP8 linear `P` (what `gpubake quantize --format fp8` writes):

    P.weight               float8_e4m3fn  [out, in]     value = weight.float() * weight_scale
    P.weight_scale         float32        [out, 1]      one scale per output row
    P.bias                 as stored      [out]

The importers produce exactly these tensors; everything else of the source is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PACKED = "weight_packed"
BLOCK_SCALE = "weight_scale"
GLOBAL_SCALE = "weight_global_scale"
INPUT_SCALE = "input_global_scale"
BLOCK = 16
FP8_WEIGHT = "weight"        # fp8_linear.FP8_WEIGHT_KEY
FP8_SCALE = "weight_scale"   # fp8_linear.FP8_SCALE_KEY


@dataclass
class Layer:
    """One converted linear: gpubake tensors plus what the manifest records of it."""

    packed: Any                    # uint8 [out, in/2], low nibble first
    block_scale: Any               # float8_e4m3fn [out, in/16], row-major
    global_scale: Any              # float32 []
    input_scale: Any | None = None  # float32 [] or None
    exact: bool = True             # gpubake's dequantization equals the producer's, bit for bit
    note: str | None = None        # why not exact, or what was rounded
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self, module: str) -> dict[str, Any]:
        out = {
            f"{module}.{PACKED}": self.packed.contiguous(),
            f"{module}.{BLOCK_SCALE}": self.block_scale.contiguous(),
            f"{module}.{GLOBAL_SCALE}": self.global_scale.reshape(()).contiguous(),
        }
        if self.input_scale is not None:
            out[f"{module}.{INPUT_SCALE}"] = self.input_scale.reshape(()).contiguous()
        return out


@dataclass
class FP8Layer:
    """One converted FP8 linear: gpubake tensors plus what the manifest records of it.
    `input_scale` is the source's static activation scale, recorded but not stored:
    FP8Linear quantizes activations per token."""

    weight: Any                    # float8_e4m3fn [out, in]
    scale: Any                     # float32 [out, 1]
    input_scale: float | None = None
    exact: bool = True             # gpubake's dequantization equals the producer's, bit for bit
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self, module: str) -> dict[str, Any]:
        return {f"{module}.{FP8_WEIGHT}": self.weight.contiguous(),
                f"{module}.{FP8_SCALE}": self.scale.contiguous()}
