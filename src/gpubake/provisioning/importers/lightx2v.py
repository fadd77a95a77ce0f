"""LightX2V's NVFP4 checkpoints (e.g. `lightx2v/Wan2.2-NVFP4-Sparse`), read by LightX2V's rules.

Read from LightX2V's source (github.com/ModelTC/LightX2V at f8aee98b):

- Names: Wan's original (`blocks.N.self_attn.q`, `cross_attn.*`, `ffn.0`, `ffn.2`):
  `lightx2v/models/networks/wan/weights/transformer_weights.py` (the `_mm_weight(...)`
  calls); the converter quantizes the 2-D tensors of `self_attn`, `cross_attn` and
  `ffn` only (`tools/convert/converter.py`, `quantize_model`, wan_dit target_keys).
- Per layer `P` (`lightx2v/common/ops/mm/mm_weight.py`, class
  `MMWeightWnvfp4Anvfp4dynamic`, `__init__` and `_get_device_tensor_pair`):
  `P.weight` uint8 `[out, in/2]` (`weight_need_transpose = False`), `P.weight_scale`
  E4M3 in the 128x4 swizzled layout (`lightx2v_kernel/python/lightx2v_kernel/gemm.py`,
  `scaled_nvfp4_quant`: "stored in a swizzled layout", padded to 128 rows and 4
  columns), and either
    * `P.input_global_scale` and `P.alpha` (the GEMM's scalar), or
    * the converter's `P.weight_global_scale` (`tools/convert/quant/quant.py`,
      `QuantWeightNVFP4`: 2688 / max|W|, in BF16) with `P.input_absmax` from a
      calibration file; then alpha = 1 / (input_global_scale * weight_global_scale).
- Nibbles: element 2i in the low nibble (`lightx2v_kernel/test/nvfp4_nvfp4/test_bench1.py`,
  `break_fp4_bytes`: "[0xAB, 0xCD] -> [0xB, 0xA, 0xD, 0xC]").
- The GEMM (`mm_weight.py` `apply` -> `cutlass_scaled_nvfp4_mm`) computes
  alpha * sum((x_codes * x_scales) * (w_codes * w_scales)), the activation quantized
  with `input_global_scale` (x * igs); so the weight it multiplies by is
  w_code * w_scale * alpha * igs.
- Every floating tensor of the checkpoint, `alpha` and `input_global_scale` included,
  is cast to the run dtype on load (`lightx2v/models/networks/base_model.py`,
  `_load_quant_ckpt`: `if f.get_tensor(k).dtype in [torch.float16, torch.bfloat16,
  torch.float]: ... .to(GET_DTYPE())`), BF16 by default and by the published configs
  (`lightx2v/utils/envs.py`, `GET_DTYPE`, `GET_SENSITIVE_DTYPE`), then back to float32
  (`mm_weight.py`, `.to(torch.float32)`).

Hence gpubake's global scale is bf16(alpha) * bf16(igs): a product of two 8-bit
significands, exact in float32, so gpubake's dequantization equals LightX2V's weight bit
for bit. The converter's form has only 1 / weight_global_scale, exact only when that
reciprocal is a float32 (else it is the nearest one, and the layer is recorded as not
exact). The activation scale is stored in gpubake's convention, 1 / bf16(igs) rounded
to float32.
"""

from __future__ import annotations

from typing import Any

from gpubake.provisioning.importers.producer import (
    SCALE_DTYPES,
    Producer,
    Read,
    Want,
    Where,
    check_scale,
    scalar,
    swizzled_shape,
    unswizzle,
    value,
)
from gpubake.provisioning.importers.source import SourceError
from gpubake.provisioning.importers.target import Layer

FORMAT = "lightx2v"
NEW = ("input_global_scale", "alpha")
OLD = "weight_global_scale"
ABSMAX = "input_absmax"
# alpha * igs * wgs == 1 up to the three BF16 roundings of LightX2V's loader (2**-9 each)
CONSISTENCY = 2.0**-6


def run_dtype(t: Any) -> Any:
    """A scalar as LightX2V's loader leaves it: cast to BF16, then to float32."""
    import torch

    return value(t).to(torch.bfloat16).to(torch.float32)


def forms(present: set[str]) -> str:
    return "alpha" if any(s in present for s in NEW) else "weight_global_scale"


class LightX2V(Producer):
    name = FORMAT

    def wants(self, module, out_f, in_f, present):
        req = {"weight": Want(("uint8",), (out_f, in_f // 2)),
               "weight_scale": Want(SCALE_DTYPES, swizzled_shape(out_f, in_f))}
        if forms(present) == "alpha":
            return {**req, "input_global_scale": scalar(), "alpha": scalar()}, {OLD: scalar()}
        return {**req, OLD: scalar()}, {ABSMAX: scalar()}

    def codes(self, out_f, in_f, read: Read):
        return read("weight"), unswizzle(read("weight_scale"), out_f, in_f)  # nibbles already low first

    def scalars(self, module, read: Read, where: Where, present) -> Layer:
        import torch

        if forms(present) == "alpha":
            a, i = run_dtype(read("alpha")), run_dtype(read("input_global_scale"))
            check_scale(a, where("alpha"))
            check_scale(i, where("input_global_scale"))
            g = a * i
            exact = float(a.double() * i.double()) == float(g)
            if OLD in present:
                w = run_dtype(read(OLD))
                check_scale(w, where(OLD))
                err = abs(float(a.double() * i.double() * w.double()) - 1.0)
                if err > CONSISTENCY:
                    raise SourceError(f"{where('alpha')}: {float(a)!r} is inconsistent with input_global_scale "
                                      f"{float(i)!r} and weight_global_scale {float(w)!r} "
                                      f"(alpha * igs * wgs = {1 + err:.6g}, expected 1)")
            note = None if exact else "bf16(alpha) * bf16(input_global_scale) is not a float32"
            inp = (1.0 / i.double()).float()
            return Layer(None, None, g, inp, exact=exact, note=note,
                         extra={"alpha": float(a), "lightx2v_input_global_scale": float(i)})
        w = run_dtype(read(OLD))
        check_scale(w, where(OLD))
        g = (1.0 / w.double()).float()  # one rounding: the float32 nearest 1 / weight_global_scale
        exact = float(g.double() * w.double()) == 1.0
        inp = None
        if ABSMAX in present:
            absmax = run_dtype(read(ABSMAX)).to(torch.bfloat16)
            check_scale(absmax, where(ABSMAX))
            igs = (2688.0 / absmax).to(torch.float32)  # mm_weight.py: (2688.0 / input_absmax).to(torch.float32)
            inp = (1.0 / igs.double()).float()
        note = None if exact else "1 / weight_global_scale is not a float32: the nearest one is stored"
        return Layer(None, None, g, inp, exact=exact, note=note, extra={"weight_global_scale": float(w)})
