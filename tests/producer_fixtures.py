"""Tiny Wan 2.2 NVFP4 and FP8 checkpoints in the producers' own formats, for the import tests.

Each starts from `make-tiny`'s BF16 diffusers checkpoint (both experts) and is written
at test time (seconds, on the CPU):

- ModelOpt: by nvidia-modelopt itself (`mtq.quantize` with `NVFP4_DEFAULT_CFG`, one
  calibration forward, `export_hf_checkpoint` of the whole WanPipeline);
- ComfyUI: each linear quantized by comfy-kitchen (`QuantizedTensor.from_float(w,
  "TensorCoreNVFP4Layout").state_dict(prefix)`), marked as ComfyUI marks it
  (`comfy/ops.py`, `MixedPrecisionOps.Linear.state_dict`: `comfy_quant` = the UTF-8 JSON
  {"format": "nvfp4"} as uint8), Wan's original names, one file per expert;
- LightX2V (not on PyPI, and its quantizer is a CUDA kernel): written here from its
  source, github.com/ModelTC/LightX2V at f8aee98b, as cited at each step.
- FP8: ComfyUI's by comfy-kitchen (`QuantizedTensor.from_float(w, "TensorCoreFP8Layout")`,
  marked {"format": "float8_e4m3fn"}); LightX2V's (`QuantWeightFP8.load_fp8_weight`, both
  its own per-row form and its `--comfyui_mode`, ComfyUI's legacy scaled-fp8 layout) from
  its source, as cited.

`calibrate` records each linear's input amax on one forward of fixed inputs: the static
activation scales ModelOpt calibrates itself, and the ones written for ComfyUI and
LightX2V.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpubake.provisioning.importers.wan_names import to_original

W = "diffusion_pytorch_model.safetensors"
EXPERTS = ("transformer", "transformer_2")
# the linears LightX2V's converter quantizes (tools/convert/converter.py, wan_dit
# target_keys self_attn, cross_attn, ffn: its 2-D tensors), in diffusers names
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bit patterns (torch.equal on them is a bit-for-bit comparison)."""
    return t.contiguous().view(torch.int32)


def assert_cpu_selftest_passes(model_dir: Path, report: Path, quantization: str = "nvfp4") -> None:
    """`gpubake selftest --device cpu` on an imported checkpoint passes every stage (the
    `gpus` stage skips: one CPU has no all-reduce to run), as the demo image, or its spec
    with another `model.quantization` (an FP8 checkpoint's image says fp8)."""
    from gpubake.cli import _run

    image = ["--image", "demo"]
    if quantization != "nvfp4":
        from gpubake.images import catalog

        (report.parent / quantization).mkdir(exist_ok=True)
        spec = report.parent / quantization / "demo.toml"  # a spec's name is its file's stem
        text = (catalog.CATALOG_DIR / "demo.toml").read_text(encoding="utf-8")
        assert text.count('quantization = "nvfp4"') == 1
        spec.write_text(text.replace('quantization = "nvfp4"', f'quantization = "{quantization}"'), encoding="utf-8")
        shutil.copytree(catalog.CATALOG_DIR / "locks", spec.parent / "locks", dirs_exist_ok=True)  # its python.lock
        image = ["--spec", str(spec)]
    rc = _run(["selftest", "--device", "cpu", "--model-dir", str(model_dir), *image, "--report", str(report)])
    data = json.loads(report.read_text())
    assert rc == 0, data["summary"]
    stages = {s["name"]: s["status"] for s in data["stages"]}
    assert data["verdict"] == "pass" and stages.pop("gpus") == "skip"
    assert stages == dict.fromkeys(["gpu", "kernels", "model", "render", "throughput"], "pass")


def block_linears(num_layers: int = 3) -> list[str]:
    return [f"blocks.{b}.{lin}" for b in range(num_layers) for lin in BLOCK_LINEARS]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 16, 1, 8, 8, generator=g).to(torch.bfloat16),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=g).to(torch.bfloat16)}


def calibrate(tiny: Path, expert: str) -> dict[str, float]:
    """{linear (diffusers name): max |input|} over one forward of fixed inputs."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(str(tiny / expert), torch_dtype=torch.bfloat16)
    amax: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: amax.__setitem__(n, max(amax.get(n, 0.0),
                                     float(args[0].detach().abs().max()))))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(**_inputs())
    for h in hooks:
        h.remove()
    return amax


# --------------------------------------------------------------------------- ComfyUI


def comfy_marker(fmt: str = "nvfp4") -> torch.Tensor:
    """`comfy/ops.py` MixedPrecisionOps.Linear.state_dict: the layer's quant config as UTF-8 JSON bytes."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


def write_comfy(tiny: Path, dest: Path, *, input_scales: tuple[str, ...] = ("attn1", "attn2"),
                prefix: str = "") -> Path:
    """Two files, `..._high_noise_...` and `..._low_noise_...`, in ComfyUI's layout. Layers
    whose name contains one of `input_scales` also get a static `input_scale` (amax / (448 * 6),
    the per-tensor scale `from_float(input, scale=input_scale)` expects)."""
    files = [f"wan2.2_t2v_tiny_{word}_noise_nvfp4.safetensors" for word in ("high", "low")]
    return _write_comfy_layout(tiny, dest, "TensorCoreNVFP4Layout", "nvfp4", 448.0 * 6.0, files, input_scales, prefix)


def _write_comfy_layout(tiny: Path, dest: Path, layout: str, fmt: str, input_max: float, files: list[str],
                        input_scales: tuple[str, ...], prefix: str) -> Path:
    """comfy-kitchen's `QuantizedTensor.from_float(w, layout).state_dict(P.weight)` for every block
    linear, its `comfy_quant` marker `fmt`, static input scales amax / `input_max` for the layers
    named in `input_scales`, Wan's original names (after `prefix`), one file per expert."""
    from comfy_kitchen.tensor.base import QuantizedTensor

    dest.mkdir(parents=True)
    for expert, fname in zip(EXPERTS, files):
        sd = load_file(str(tiny / expert / W))
        amax = calibrate(tiny, expert)
        out: dict[str, torch.Tensor] = {}
        quantized = set(block_linears())
        for name, t in sd.items():
            module = name.rpartition(".")[0]
            if module in quantized and name.endswith(".weight"):
                out.update(QuantizedTensor.from_float(t, layout).state_dict(f"{module}.weight"))
                out[f"{module}.comfy_quant"] = comfy_marker(fmt)
                if any(s in module for s in input_scales):
                    out[f"{module}.input_scale"] = torch.tensor(amax[module] / input_max, dtype=torch.float32)
            else:
                out[name] = t
        names = to_original(list(out))
        save_file({prefix + orig: out[name].contiguous() for orig, name in names.items()}, str(dest / fname))
    return dest


# --------------------------------------------------------------------------- LightX2V

FLOAT4_E2M1_MAX = 6.0


def lightx2v_cast_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """`lightx2v_kernel/test/nvfp4_nvfp4/fake_quant.py`, `cast_to_fp4`: round to the E2M1 grid."""
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def lightx2v_quant(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fake_quant.py`, `ref_nvfp4_quant` (the reference of `scaled_nvfp4_quant`): E2M1 values
    [m, n] and E4M3 block scales [m, n/16] (row-major)."""
    m, n = w.shape
    x = w.reshape(m, n // 16, 16)
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * (1.0 / FLOAT4_E2M1_MAX))
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = global_scale * torch.where(scale == 0, torch.zeros(()), 1.0 / scale)
    scaled_x = x.to(torch.float32) * output_scale
    clipped = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return lightx2v_cast_to_fp4(clipped), scale.squeeze(-1).to(torch.float8_e4m3fn)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def lightx2v_pack(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values -> bytes, element 2i in the low nibble (`test_bench1.py`, `break_fp4_bytes`,
    "[0xAB, 0xCD] -> [0xB, 0xA, 0xD, 0xC]", inverted)."""
    mag = torch.zeros(values.shape, dtype=torch.uint8)
    for code, v in enumerate(_E2M1):
        mag[values.abs() == v] = code
    codes = mag | (torch.signbit(values).to(torch.uint8) << 3)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def lightx2v_swizzle(scale: torch.Tensor) -> torch.Tensor:
    """Row-major [m, k] scales -> the kernel's swizzled layout: the inverse of `test_bench1.py`
    `convert_swizzled_to_linear` (reshape (1, m_tiles, k_tiles, 32, 4, 4), permute (0, 1, 4, 3, 2, 5)),
    zero-padded to 128 rows and 4 columns as `gemm.py` `scaled_nvfp4_quant` allocates it."""
    m, k = scale.shape
    mt, kt = (m + 127) // 128, (k + 3) // 4
    lin = torch.zeros((mt * 128, kt * 4), dtype=torch.uint8)
    lin[:m, :k] = scale.view(torch.uint8)
    swz = lin.reshape(mt, 4, 32, kt, 4).permute(0, 3, 2, 1, 4).reshape(mt * 128, kt * 4)
    return swz.contiguous().view(torch.float8_e4m3fn)


def lightx2v_unswizzle(a_sf_swizzled: torch.Tensor, m: int, k: int, block_size: int = 16) -> torch.Tensor:
    """`test_bench1.py`, `convert_swizzled_to_linear`, as written there (k = the weight's in_features)."""
    m_tiles = (m + 128 - 1) // 128
    f = block_size * 4
    k_tiles = (k + f - 1) // f
    tmp = torch.reshape(a_sf_swizzled, (1, m_tiles, k_tiles, 32, 4, 4))
    tmp = torch.permute(tmp, (0, 1, 4, 3, 2, 5))
    out = tmp.reshape(m_tiles * 128, k_tiles * f // block_size)
    return out[0:m, 0:k]


def write_lightx2v(tiny: Path, dest: Path, *, form: str = "alpha", sharded: bool = False) -> Path:
    """LightX2V's checkpoint of the tiny model: `high_nvfp4.safetensors` / `low_nvfp4.safetensors`
    (`configs/wan22/extreme/wan_moe_t2v_distill_nvfp4_sparse_attn.json`, high/low_noise_quantized_ckpt),
    or with `sharded`, Wan's `high_noise_model/` and `low_noise_model/` folders of two shards.

    form "alpha": per layer `weight`, `weight_scale`, `input_global_scale`, `alpha` (what
    `mm_weight.py` MMWeightWnvfp4Anvfp4dynamic reads without calibration data); form
    "weight_global_scale": the converter's `weight`, `weight_scale`, `weight_global_scale`
    (`tools/convert/converter.py`: key + "_scale", key + "_global_scale")."""
    dest.mkdir(parents=True)
    for expert, word in zip(EXPERTS, ("high", "low")):
        sd = load_file(str(tiny / expert / W))
        amax = calibrate(tiny, expert)
        out: dict[str, torch.Tensor] = {}
        quantized = set(block_linears())
        for name, t in sd.items():
            module = name.rpartition(".")[0]
            if module in quantized and name.endswith(".weight"):
                w = t.to(torch.bfloat16)
                # tools/convert/quant/quant.py, QuantWeightNVFP4.load_fp4_weight (BF16 arithmetic, then fp32)
                weight_global_scale = (2688.0 / torch.max(torch.abs(w))).to(torch.float32)
                values, scales = lightx2v_quant(w, weight_global_scale)
                out[name] = lightx2v_pack(values)
                out[f"{module}.weight_scale"] = lightx2v_swizzle(scales)
                if form == "alpha":
                    # mm_weight.py, _get_device_tensor_pair: input_global_scale = (2688.0 / input_absmax)
                    # .to(torch.float32); alpha = 1.0 / (input_global_scale * weight_global_scale)
                    input_global_scale = (2688.0 / torch.tensor(amax[module], dtype=torch.float32)).to(torch.float32)
                    out[f"{module}.input_global_scale"] = input_global_scale
                    out[f"{module}.alpha"] = 1.0 / (input_global_scale * weight_global_scale)
                else:
                    out[f"{module}.weight_global_scale"] = weight_global_scale
            else:
                out[name] = t.to(torch.bfloat16)  # converter: non-quantized tensors in non_linear_dtype (BF16)
        named = {orig: out[name].contiguous() for orig, name in to_original(list(out)).items()}
        if not sharded:
            save_file(named, str(dest / f"{word}_nvfp4.safetensors"))
            continue
        d = dest / f"{word}_noise_model"
        d.mkdir()
        keys = sorted(named)
        halves = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
        for fname, ks in halves.items():
            save_file({k: named[k] for k in ks}, str(d / fname))
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}, indent=2))
    return dest


# E4M3 codes 0x30..0x47: block scales 0.5 .. 3.75 (finite, positive)
_SCALE_CODES = (0x30, 0x48)


def write_lightx2v_random(dest: Path, config: dict[str, Any], *, seed: int = 0,
                          files: tuple[str, str] = ("high_nvfp4.safetensors", "low_nvfp4.safetensors"),
                          ) -> dict[str, Any]:
    """Random weights in LightX2V's layout, at any size (full A14B: `bench/bench_lightx2v_clip.py`):
    what `write_lightx2v` writes, without the BF16 model or the quantizer. Per expert one
    file (`files`: high, low): the BLOCK_LINEARS as random E2M1 codes (random bytes),
    random E4M3 block scales in LightX2V's swizzled layout, and `input_global_scale` /
    `alpha` scalars sized so a weight's RMS is torch's default Linear init, 1 / sqrt(3 fan_in)
    (random weights that stay finite through 40 blocks); every other tensor BF16, random at
    the same scale (norm weights 1, vectors 0.01); Wan's original names. Returns
    {"bytes", "seconds"}.

    Bytes come from numpy's PCG64 (`Generator.bytes`): ~GB/s, so two 8.4 GB experts take
    seconds to make, and the writing is disk-bound."""
    import time

    import numpy as np

    from gpubake.provisioning import layout

    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    shapes, _ = layout.expected_shapes(layout.empty_transformer(config))
    quantized = set(block_linears(int(config["num_layers"])))
    igs = torch.tensor(2688.0 / 8.0, dtype=torch.float32)  # a static activation amax of 8
    total = 0
    for i, (expert, name) in enumerate(zip(EXPERTS, files)):
        rng = np.random.default_rng(seed + i)
        gen = torch.Generator().manual_seed(seed + i)
        out: dict[str, torch.Tensor] = {}
        for key, shape in sorted(shapes.items()):
            module, _, leaf = key.rpartition(".")
            if module in quantized and leaf == "weight":
                out_f, in_f = shape
                codes = torch.frombuffer(bytearray(rng.bytes(out_f * in_f // 2)), dtype=torch.uint8)
                out[key] = codes.reshape(out_f, in_f // 2)
                sf = rng.integers(*_SCALE_CODES, size=(out_f, in_f // 16), dtype=np.uint8)
                out[f"{module}.weight_scale"] = lightx2v_swizzle(torch.from_numpy(sf).view(torch.float8_e4m3fn))
                # E2M1 codes drawn uniformly have RMS sqrt(68.5 / 8) = 2.93, the block scales ~1.9
                global_scale = (3.0 * in_f) ** -0.5 / (2.93 * 1.9)
                out[f"{module}.input_global_scale"] = igs.clone()
                out[f"{module}.alpha"] = (torch.tensor(global_scale, dtype=torch.float32) / igs).to(torch.float32)
            elif "norm" in key and leaf == "weight":
                out[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                std = (3.0 * math.prod(shape[1:])) ** -0.5 if len(shape) > 1 else 0.01
                out[key] = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
        named = {orig: out[k].contiguous() for orig, k in to_original(list(out)).items()}
        save_file(named, str(dest / name))
        total += (dest / name).stat().st_size
        del out, named
    return {"bytes": total, "seconds": round(time.perf_counter() - t0, 2)}


def lightx2v_weight(sd: dict[str, torch.Tensor], module: str, out_f: int, in_f: int) -> torch.Tensor:
    """The weight LightX2V's GEMM multiplies by, exactly (float64, then rounded once to float32).

    `mm_weight.py` apply: cutlass_scaled_nvfp4_mm(x_fp4, w_fp4, x_sf, w_sf, alpha) =
    alpha * sum((x_codes * x_sf) * (w_codes * w_sf)) with x quantized by input_global_scale
    (x * igs), so w = w_codes * w_sf * alpha * igs; alpha and igs as the loader leaves them
    (`base_model.py` _load_quant_ckpt: .to(GET_DTYPE()) = BF16, then mm_weight.py
    .to(torch.float32)); codes as `test_bench1.py` break_fp4_bytes unpacks them, scales
    as its convert_swizzled_to_linear unswizzles them."""
    packed = sd[f"{module}.weight"]
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       dtype=torch.float64)
    low, high = lut[(packed & 0x0F).long()], lut[(packed >> 4).long()]
    codes = torch.stack((low, high), dim=-1).reshape(out_f, in_f)
    sf = lightx2v_unswizzle(sd[f"{module}.weight_scale"].view(torch.float8_e4m3fn), out_f, in_f).to(torch.float64)
    if f"{module}.alpha" in sd:
        alpha = sd[f"{module}.alpha"].to(torch.bfloat16).to(torch.float32).double()
        igs = sd[f"{module}.input_global_scale"].to(torch.bfloat16).to(torch.float32).double()
        g = alpha * igs
    else:  # test_bench1.py dequantize_to_dtype: tensor_sf.to(torch.float32) / global_scale (here in float64:
        # the one product that is not exact, 53 bits against float32's 24)
        g = 1.0 / sd[f"{module}.weight_global_scale"].to(torch.bfloat16).to(torch.float32).double()
    w = codes.reshape(out_f, in_f // 16, 16) * (sf * g).unsqueeze(-1)
    return w.reshape(out_f, in_f).to(torch.float32)


# --------------------------------------------------------------------------- FP8 (LightX2V, ComfyUI)

FP8_FILES = {"lightx2v": ("wan2.2_t2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                          "wan2.2_t2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors"),
             "comfy": ("wan2.2_t2v_tiny_high_noise_fp8_scaled.safetensors",
                       "wan2.2_t2v_tiny_low_noise_fp8_scaled.safetensors")}


def lightx2v_fp8_quant(w: torch.Tensor, comfyui_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`tools/convert/quant/quant.py`, `QuantWeightFP8.load_fp8_weight`, in the weight's dtype:
    (E4M3 weight [out, in], scales [out, 1], or a 0-dim scale with `comfyui_mode`). LightX2V
    rounds with qtorch's `float_quantize(x.float(), 4, 3, rounding="nearest")` (not installed
    here); torch's cast of the clipped value rounds to nearest E4M3 too. The importer copies
    the bytes, so how they were rounded does not change what is checked."""
    if not comfyui_mode:
        max_val = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
    else:
        max_val = w.abs().max()
    finfo = torch.finfo(torch.float8_e4m3fn)
    scales = max_val / finfo.max
    scaled = torch.clip(w / scales, finfo.min, finfo.max)
    w_q = scaled.float().to(torch.float8_e4m3fn)
    if not comfyui_mode:
        scales = scales.view(w.shape[0], -1)
    return w_q, scales


def write_lightx2v_fp8(tiny: Path, dest: Path, *, comfyui_mode: bool = False,
                       scale_dtype: torch.dtype | None = None) -> Path:
    """LightX2V's FP8 checkpoint of the tiny model, one file per expert named as
    `lightx2v/Wan2.2-Distill-Models` names its files: per block linear `P.weight` (E4M3) and
    `P.weight_scale` (`converter.py` quantize_model: key + "_scale"); with `comfyui_mode`,
    `P.scale_weight` (key.replace(".weight", ".scale_weight")) and the `scaled_fp8` marker
    zeros(2, float8_e4m3fn). Non-quantized tensors in `--non_linear_dtype torch.bfloat16`.
    `scale_dtype` stores the per-row scales in another dtype (what a float32 source would give)."""
    dest.mkdir(parents=True)
    for expert, fname in zip(EXPERTS, FP8_FILES["lightx2v"]):
        sd = load_file(str(tiny / expert / W))
        out: dict[str, torch.Tensor] = {}
        quantized = set(block_linears())
        for name, t in sd.items():
            module = name.rpartition(".")[0]
            if module in quantized and name.endswith(".weight"):
                w = t.to(torch.bfloat16)
                w_q, scales = lightx2v_fp8_quant(w, comfyui_mode)
                out[name] = w_q
                if comfyui_mode:
                    out[f"{module}.scale_weight"] = scales
                else:
                    out[f"{module}.weight_scale"] = scales if scale_dtype is None else (
                        w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / 448.0).to(scale_dtype)
            else:
                out[name] = t.to(torch.bfloat16)
        named = {orig: out[name].contiguous() for orig, name in to_original(list(out)).items()}
        if comfyui_mode:
            named["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
        save_file(named, str(dest / fname))
    return dest


def lightx2v_fp8_weight(sd: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """The weight LightX2V's `fp8-vllm` GEMM multiplies by: weight.float() * weight_scale, the
    scale as its loader leaves it (`base_model.py` _load_quant_ckpt: .to(GET_DTYPE()) = BF16;
    `mm_weight.py` post_process, scale_force_fp32: .to(torch.float32))."""
    scale = sd[f"{module}.weight_scale"].to(torch.bfloat16).to(torch.float32)
    return sd[f"{module}.weight"].float() * scale.reshape(-1, 1)


def write_comfy_fp8(tiny: Path, dest: Path, *, input_scales: tuple[str, ...] = ("attn1", "attn2"),
                    prefix: str = "") -> Path:
    """ComfyUI's FP8 checkpoint of the tiny model, by comfy-kitchen: each block linear
    `QuantizedTensor.from_float(w, "TensorCoreFP8Layout").state_dict(P.weight)` (`P.weight`,
    `P.weight_scale`), marked `comfy_quant` {"format": "float8_e4m3fn"} as `comfy/ops.py`
    `Linear.state_dict` marks it; layers named in `input_scales` get a static `input_scale`
    (amax / 448). Wan's original names, one file per expert."""
    return _write_comfy_layout(tiny, dest, "TensorCoreFP8Layout", "float8_e4m3fn", 448.0, list(FP8_FILES["comfy"]),
                               input_scales, prefix)


# --------------------------------------------------------------------------- ModelOpt


# ModelOpt's Wan recipe (NVIDIA/Model-Optimizer examples/diffusers/quantization/utils.py,
# filter_func_wan_video: patch_embedding, condition_embedder, proj_out and blocks 0-2 and
# 37-39 of 40 stay unquantized), for 3 blocks: the first one.
WAN_RECIPE_KEEP = re.compile(r".*(patch_embedding|condition_embedder|proj_out|blocks\.0\.).*")


def write_modelopt(tiny: Path, dest: Path, *, max_shard_size: str = "10GB", recipe: str = "wan") -> Path:
    """The whole tiny WanPipeline quantized and exported by ModelOpt itself: `mtq.quantize` with
    NVFP4_DEFAULT_CFG, then (recipe "wan") `mtq.disable_quantizer(backbone, filter_func)` as
    ModelOpt's examples/diffusers/quantization/quantize.py does; recipe "default" keeps every
    quantizer of the default config (the condition embedder's linears too)."""
    import modelopt.torch.quantization as mtq
    from diffusers import WanPipeline
    from modelopt.torch.export import export_hf_checkpoint

    pipe = WanPipeline.from_pretrained(str(tiny), torch_dtype=torch.bfloat16)

    def forward_loop(model: Any) -> None:
        with torch.no_grad():
            model(**_inputs())

    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt reports every component on stdout
        for expert in EXPERTS:
            mtq.quantize(getattr(pipe, expert), mtq.NVFP4_DEFAULT_CFG, forward_loop=forward_loop)
            if recipe == "wan":
                mtq.disable_quantizer(getattr(pipe, expert), lambda name: WAN_RECIPE_KEEP.match(name) is not None)
        export_hf_checkpoint(pipe, export_dir=str(dest), max_shard_size=max_shard_size)
    return dest


def with_header_metadata(src, dst, fmt: str) -> None:
    """One ComfyUI file rewritten the older way: its `comfy_quant` marker tensors dropped and
    the layers listed in the header's `_quantization_metadata` instead, under ComfyUI's
    `model.diffusion_model.` prefix (both ways must import to the same checkpoint)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    layers = {k[: -len(".comfy_quant")]: {"format": fmt} for k in sd if k.endswith(".comfy_quant")}
    sd = {f"model.diffusion_model.{k}": v for k, v in sd.items() if not k.endswith(".comfy_quant")}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        f"model.diffusion_model.{k}": v for k, v in layers.items()}})}
    save_file(sd, str(dst), metadata=meta)
