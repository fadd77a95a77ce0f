"""LightX2V's FP8 checkpoints (e.g. `lightx2v/Wan2.2-Distill-Models`' `..._scaled_fp8_e4m3_lightx2v_4step`
files), read by LightX2V's rules.

Read from LightX2V's source (github.com/ModelTC/LightX2V at f8aee98b):

- Names: Wan's original (`blocks.N.self_attn.q`, `cross_attn.*`, `ffn.0`, `ffn.2`), as for
  NVFP4 (`lightx2v.py`); the converter quantizes the 2-D tensors of `self_attn`,
  `cross_attn` and `ffn` (`tools/convert/converter.py`, `quantize_model`).
- Per layer `P` (`tools/convert/quant/quant.py`, `QuantWeightFP8.load_fp8_weight`, and
  `converter.py` `quantize_model`: `weights[key + "_scale"] = scales`):

      P.weight        float8_e4m3fn  [out, in]  float_quantize(clip(w / scales, -448, 448), 4, 3, "nearest")
      P.weight_scale  w's dtype      [out, 1]   amax(|w|, dim=1, keepdim=True).clamp(min=1e-5) / 448

  (`scales.view(out, -1)`), the weight in the source's dtype: BF16 for Wan 2.2.
- The loader (`lightx2v/common/ops/mm/mm_weight.py`, `MMWeightWfp8channelAfp8channeldynamicVllm`,
  `fp8-vllm`: `load_quantized`, then `post_process` with `scale_force_fp32 = True`:
  `weight_scale.to(torch.float32)`) and the GEMM (`cutlass_scaled_mm(out, x_q, weight.t(),
  x_scale, weight_scale, bias)`): W = weight.float() * weight_scale, per output row.
- Before that, every floating tensor of the checkpoint (the scales included: their names
  hold none of Wan's `sensitive_layer` words) is cast to the run dtype on load
  (`lightx2v/models/networks/base_model.py`, `_load_quant_ckpt`: `.to(GET_DTYPE())`, BF16
  by default, `lightx2v/utils/envs.py`), as `lightx2v.py` describes for NVFP4.

Hence gpubake's scale is float32(bf16(weight_scale)): the stored value itself for the
BF16 scales the converter writes from a BF16 model (exact), rounded to BF16 first for a
float32 or fp16 scale, as LightX2V's loader does (recorded per layer, `scale_rounded`).
The weight bytes are copied. A `weight_scale` of another shape (a per-tensor scalar, a
block scale) is refused in one line naming the key.

LightX2V's `--comfyui_mode` (same converter, `load_fp8_weight(w, comfyui_mode=True)`:
one per-tensor scale `max|w| / 448`, stored as `P.scale_weight`, and a `scaled_fp8` marker
tensor `zeros(2, float8_e4m3fn)`) writes ComfyUI's legacy layout, imported as `comfy`
(`comfy_fp8.py`).
"""

from __future__ import annotations

from typing import Any

from gpubake.provisioning.importers.producer import FLOATS, FP8_DTYPE, Producer, Read, Want, Where, check_scales, row_scale
from gpubake.provisioning.importers.target import FP8Layer

FORMAT = "lightx2v"


class LightX2VFP8(Producer):
    name = FORMAT
    precision = "fp8"

    def wants(self, module, out_f, in_f, present):
        return {"weight": Want((FP8_DTYPE,), (out_f, in_f)),
                "weight_scale": Want(FLOATS, (out_f, 1), also=((out_f,),))}, {}

    def scalars(self, module, read: Read, where: Where, present) -> Any:
        import torch

        stored = read("weight_scale")
        check_scales(stored, where("weight_scale"))
        run = stored.to(torch.bfloat16)  # _load_quant_ckpt: .to(GET_DTYPE())
        check_scales(run, where("weight_scale") + " (as BF16, LightX2V's run dtype)")
        rounded = stored.dtype != torch.bfloat16 and not torch.equal(run.to(stored.dtype), stored)
        layer = FP8Layer(None, row_scale(run, stored.shape[0]))
        if rounded:
            layer.extra["scale_rounded"] = f"{str(stored.dtype).removeprefix('torch.')} -> bfloat16 (LightX2V's loader)"
        return layer

    def convert(self, module, out_f, in_f, read: Read, where: Where, present) -> FP8Layer:
        layer = self.scalars(module, read, where, present)
        layer.weight = read("weight")
        return layer
