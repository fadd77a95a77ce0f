"""gpubake import of FP8 checkpoints (LightX2V's per-row, ComfyUI's per-tensor and legacy
scaled-fp8) into gpubake's `fp8` format: bit-exact dequantization against the producer's,
the same tensors `quantize --format fp8` writes, a load and forward close to BF16, the
self-test, and one-line refusals that leave nothing at DEST.

Fixtures (tests/producer_fixtures.py): ComfyUI's by comfy-kitchen itself
(`TensorCoreFP8Layout`), LightX2V's from its source (tools/convert/quant/quant.py
`QuantWeightFP8.load_fp8_weight`, converter.py `quantize_model`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from producer_fixtures import (
    FP8_FILES,
    assert_cpu_selftest_passes,
    block_linears,
    comfy_marker,
    float_bits,
    lightx2v_fp8_weight,
    with_header_metadata,
    write_comfy_fp8,
    write_lightx2v,
    write_lightx2v_fp8,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpubake.cli import _run
from gpubake.kernels.fp8_linear import FP8_SCALE_KEY, FP8_WEIGHT_KEY, FP8Linear, dequantize_fp8
from gpubake.provisioning import layout
from gpubake.provisioning.importers import detect, target
from gpubake.provisioning.importers.convert import import_checkpoint
from gpubake.provisioning.importers.source import SourceError
from gpubake.provisioning.importers.wan_names import to_original
from gpubake.provisioning.loader import checkpoint_format, load_pipeline
from gpubake.provisioning.manifest import read_manifest, verify_tree
from testutil import edit_safetensors, import_refused, tiny_forward

W = "diffusion_pytorch_model.safetensors"
EXPERTS = ("transformer", "transformer_2")
LX_HIGH, LX_LOW = FP8_FILES["lightx2v"]
CF_HIGH, CF_LOW = FP8_FILES["comfy"]


def _orig(module: str) -> str:
    (o,) = to_original([f"{module}.weight"])
    return o[: -len(".weight")]


@pytest.fixture(scope="module")
def lx_src(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_lightx2v_fp8(tiny_checkpoint, tmp_path_factory.mktemp("lxfp8") / "src")


@pytest.fixture(scope="module")
def lx_out(lx_src, tiny_checkpoint, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("lxfp8") / "out"
    import_checkpoint(lx_src, dest, base=tiny_checkpoint, progress=False)
    return dest


@pytest.fixture(scope="module")
def comfy_src(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_comfy_fp8(tiny_checkpoint, tmp_path_factory.mktemp("cffp8") / "src")


@pytest.fixture(scope="module")
def comfy_out(comfy_src, tiny_checkpoint, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("cffp8") / "out"
    import_checkpoint(comfy_src, dest, base=tiny_checkpoint, progress=False)
    return dest


# --------------------------------------------------------------------------- exactness


def test_lightx2v_dequantization_equals_lightx2vs_bit_for_bit(lx_src, lx_out):
    """weight.float() * float32(bf16(weight_scale)) (LightX2V's loader and fp8-vllm GEMM) equals
    gpubake's dequantize_fp8 of the import for every layer; the bytes are LightX2V's own."""
    for expert, fname in zip(EXPERTS, (LX_HIGH, LX_LOW)):
        src, out = load_file(str(lx_src / fname)), load_file(str(lx_out / expert / W))
        for module in block_linears():
            o = _orig(module)
            w, s = out[f"{module}.weight"], out[f"{module}.weight_scale"]
            assert (w.dtype, s.dtype, tuple(s.shape)) == (torch.float8_e4m3fn, torch.float32, (w.shape[0], 1))
            assert torch.equal(w.view(torch.uint8), src[f"{o}.weight"].view(torch.uint8)), module
            assert torch.equal(float_bits(dequantize_fp8(w, s)), float_bits(lightx2v_fp8_weight(src, o))), module
            assert torch.equal(out[f"{module}.bias"], src[f"{o}.bias"])
        for kept in ("patch_embedding.weight", "proj_out.weight", "blocks.0.norm2.weight", "scale_shift_table"):
            (o,) = to_original([kept])
            assert torch.equal(out[kept], src[o]) and out[kept].dtype == src[o].dtype, kept  # copied as they are


def test_comfy_dequantization_equals_comfy_kitchens_bit_for_bit(comfy_src, comfy_out):
    """comfy-kitchen's own dequantize_per_tensor_fp8 (float32) equals gpubake's; the per-tensor
    scale is every row's scale; input_scale is recorded in the manifest and not stored."""
    from comfy_kitchen.backends.eager.quantization import dequantize_per_tensor_fp8

    layers = read_manifest(comfy_out)["quantization"]["layers"]
    for expert, fname in zip(EXPERTS, (CF_HIGH, CF_LOW)):
        src, out = load_file(str(comfy_src / fname)), load_file(str(comfy_out / expert / W))
        for module in block_linears():
            o = _orig(module)
            theirs = dequantize_per_tensor_fp8(src[f"{o}.weight"], src[f"{o}.weight_scale"], torch.float32)
            ours = dequantize_fp8(out[f"{module}.weight"], out[f"{module}.weight_scale"])
            assert torch.equal(float_bits(ours), float_bits(theirs)), module
            assert torch.equal(out[f"{module}.weight_scale"],
                               src[f"{o}.weight_scale"].reshape(1, 1).expand(ours.shape[0], 1))
            assert not any(k.startswith(f"{module}.") and k.rpartition(".")[2] in ("input_scale", "comfy_quant")
                           for k in out)
            entry = layers[f"{expert}/{module}"]
            if "attn" in module:
                assert entry["input_scale"] == float(src[f"{o}.input_scale"])
            else:
                assert entry["input_scale"] is None


def test_float32_scales_are_rounded_as_lightx2vs_loader_rounds_them(tiny_checkpoint, tmp_path):
    """A float32 weight_scale runs as bf16 in LightX2V (`_load_quant_ckpt` .to(GET_DTYPE())): the
    import stores that value and says so per layer."""
    src = write_lightx2v_fp8(tiny_checkpoint, tmp_path / "src", scale_dtype=torch.float32)
    dest = tmp_path / "out"
    import_checkpoint(src, dest, base=tiny_checkpoint, progress=False)
    sd, out = load_file(str(src / LX_HIGH)), load_file(str(dest / "transformer" / W))
    rounded = 0
    for module in block_linears():
        o = _orig(module)
        assert sd[f"{o}.weight_scale"].dtype == torch.float32
        assert torch.equal(float_bits(dequantize_fp8(out[f"{module}.weight"], out[f"{module}.weight_scale"])),
                           float_bits(lightx2v_fp8_weight(sd, o)))
        entry = read_manifest(dest)["quantization"]["layers"][f"transformer/{module}"]
        rounded += "scale_rounded" in entry.get("source_values", {})
    assert rounded == len(block_linears())  # amax / 448 is seldom a bf16


# --------------------------------------------------------------------------- the checkpoint


def test_the_import_holds_what_quantize_fp8_writes(lx_out, comfy_out, tiny_fp8_checkpoint):
    """Same keys, shapes and quantized dtypes as `gpubake quantize --format fp8` (its default
    policy quantizes the same block linears), the same manifest record, fp8 to the loader."""
    ref_m = read_manifest(tiny_fp8_checkpoint)
    for out in (lx_out, comfy_out):
        m = read_manifest(out)
        verify_tree(out)
        assert m["format"] == "fp8" and checkpoint_format(out) == "fp8"
        q = m["quantization"]
        for key in ("format", "weight_dtype", "scale_dtype", "scale_layout", "experts"):
            assert q[key] == ref_m["quantization"][key], key
        assert set(q["layers"]) == set(ref_m["quantization"]["layers"])
        assert all(v["exact"] and v["nan_weights"] == 0 and v["sqnr_db"] is None for v in q["layers"].values())
        for expert in EXPERTS:
            with safe_open(str(out / expert / W), framework="pt") as a, \
                    safe_open(str(tiny_fp8_checkpoint / expert / W), framework="pt") as b:
                assert set(a.keys()) == set(b.keys())
                for k in a.keys():
                    sa, sb = a.get_slice(k), b.get_slice(k)
                    assert sa.get_shape() == sb.get_shape(), k
                    if k.rpartition(".")[0] in layout.fp8_modules(layout.tensor_shapes([out / expert / W])) \
                            and not k.endswith(".bias"):
                        assert sa.get_dtype() == sb.get_dtype(), k
    assert (target.FP8_WEIGHT, target.FP8_SCALE) == (FP8_WEIGHT_KEY, FP8_SCALE_KEY)


@pytest.mark.parametrize("which", ["lightx2v", "comfy"])
def test_load_pipeline_gives_fp8_layers_close_to_bf16(which, lx_out, comfy_out, tiny_checkpoint):
    pipe, bf16 = load_pipeline(lx_out if which == "lightx2v" else comfy_out, "cpu"), load_pipeline(tiny_checkpoint, "cpu")
    for name in EXPERTS:
        model = getattr(pipe, name)
        assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 30
        y, ref = tiny_forward(model), tiny_forward(getattr(bf16, name))
        assert torch.isfinite(y).all()
        assert float((y - ref).norm() / ref.norm()) < 0.03  # quantize --format fp8's bound


def test_cli_import_then_selftest_passes(comfy_src, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    assert _run(["import", str(comfy_src), str(dest), "--base", str(tiny_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["format"], out["checkpoint_format"], out["quantized_layers"], out["exact_layers"]) == \
        ("comfy", "fp8", 60, 60)
    assert out["activation_scales"] == 48 and out["model_id"] == "tiny-wan2.2"
    assert_cpu_selftest_passes(dest, tmp_path / "selftest.json", quantization="fp8")
    stages = {st["name"]: st for st in json.loads((tmp_path / "selftest.json").read_text())["stages"]}
    assert stages["model"]["values"]["format"] == "fp8" and stages["kernels"]["values"]["format"] == "fp8"


def test_forced_producer_name_reads_the_precision_from_the_dtypes(lx_src, lx_out, tiny_checkpoint, tmp_path):
    dest = tmp_path / "out"
    res = import_checkpoint(lx_src, dest, "lightx2v", base=tiny_checkpoint, progress=False)
    assert res["checkpoint_format"] == "fp8"
    for expert in EXPERTS:
        a, b = load_file(str(dest / expert / W)), load_file(str(lx_out / expert / W))
        assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


# --------------------------------------------------------------------------- ComfyUI's other layouts


def test_lightx2v_comfyui_mode_is_comfys_legacy_scaled_fp8(tiny_checkpoint, tmp_path):
    """LightX2V's --comfyui_mode (P.scale_weight per tensor, a `scaled_fp8` marker) is ComfyUI's
    legacy layout: imported as comfy, W = weight * float32(scale_weight) in every row."""
    src = write_lightx2v_fp8(tiny_checkpoint, tmp_path / "src", comfyui_mode=True)
    dest = tmp_path / "out"
    res = import_checkpoint(src, dest, base=tiny_checkpoint, progress=False)
    assert (res["format"], res["checkpoint_format"], res["activation_scales"]) == ("comfy", "fp8", 0)
    sd, out = load_file(str(src / LX_LOW)), load_file(str(dest / "transformer_2" / W))
    assert "scaled_fp8" not in out
    for module in block_linears():
        o = _orig(module)
        ref = sd[f"{o}.weight"].float() * sd[f"{o}.scale_weight"].float()
        assert torch.equal(float_bits(dequantize_fp8(out[f"{module}.weight"], out[f"{module}.weight_scale"])),
                           float_bits(ref)), module
    entry = read_manifest(dest)["quantization"]["layers"]["transformer_2/blocks.1.attn1.to_q"]
    assert entry["source_values"]["layout"] == "scaled_fp8" and entry["source_values"]["full_precision_matrix_mult"]


def test_header_metadata_and_prefix_variant_gives_the_same_checkpoint(comfy_src, comfy_out, tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for fname in (CF_HIGH, CF_LOW):
        with_header_metadata(comfy_src / fname, src / fname, "float8_e4m3fn")
    dest = tmp_path / "out"
    import_checkpoint(src, dest, base=tiny_checkpoint, progress=False)
    for expert in EXPERTS:
        a, b = load_file(str(dest / expert / W)), load_file(str(comfy_out / expert / W))
        assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_a_no_op_scale_beside_a_bf16_weight_is_dropped_and_any_other_refused(tiny_checkpoint, tmp_path, capsys):
    """Legacy files may leave `scale_weight` = 1.0 beside an unquantized weight (ComfyUI's
    convert_old_quants would then cast it to FP8); gpubake keeps the BF16 weight, drops the 1.0."""
    src = write_lightx2v_fp8(tiny_checkpoint, tmp_path / "src", comfyui_mode=True)
    edit_safetensors(src / LX_HIGH, lambda sd: sd.__setitem__("head.head.scale_weight", torch.tensor(1.0)))
    dest = tmp_path / "ok"
    res = import_checkpoint(src, dest, base=tiny_checkpoint, progress=False)
    out = load_file(str(dest / "transformer" / W))
    assert out["proj_out.weight"].dtype == torch.bfloat16 and "proj_out.scale_weight" not in out
    assert read_manifest(dest)["quantization"]["summary"]["dropped_dummy_scales"] == 1 and res["quantized_layers"] == 60
    edit_safetensors(src / LX_HIGH, lambda sd: sd.__setitem__("head.head.scale_weight", torch.tensor(0.5)))
    dest = tmp_path / "bad"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{src / LX_HIGH}: head.head.scale_weight: beside an unquantized weight, a scale must be a scalar 1.0" in err


# --------------------------------------------------------------------------- refusals


def _nan_row(sd):
    sd["blocks.2.ffn.2.weight_scale"][3, 0] = float("nan")


LX_CASES = {
    "scale per tensor": (lambda sd: sd.__setitem__("blocks.0.self_attn.q.weight_scale", torch.tensor(0.01)),
                         "{f}: blocks.0.self_attn.q.weight_scale: shape [], expected [64, 1] or [64]"),
    "scale per block": (lambda sd: sd.__setitem__("blocks.0.self_attn.q.weight_scale", torch.ones(64, 4)),
                        "{f}: blocks.0.self_attn.q.weight_scale: shape [64, 4], expected [64, 1] or [64]"),
    "NaN scale": (_nan_row, "{f}: blocks.2.ffn.2.weight_scale: row 3: nan is not a positive finite scale"),
    "negative scale": (lambda sd: sd["blocks.1.cross_attn.o.weight_scale"].neg_(),
                       "{f}: blocks.1.cross_attn.o.weight_scale: row 0: -"),
    "missing scale": (lambda sd: sd.pop("blocks.1.self_attn.k.weight_scale"),
                      "{f}: missing tensor blocks.1.self_attn.k.weight_scale of a lightx2v FP8 layer"),
    "missing weight": (lambda sd: sd.pop("blocks.1.self_attn.k.weight"), "{f}: missing tensor blocks.1.self_attn.k.weight"),
    "mis-shaped weight": (lambda sd: sd.__setitem__("blocks.0.ffn.0.weight", sd["blocks.0.ffn.0.weight"][:64].contiguous()),
                          "{f}: blocks.0.ffn.0.weight: shape [64, 64], expected [128, 64]"),
    "an NVFP4 layer among FP8 ones": (
        lambda sd: sd.__setitem__("blocks.2.ffn.0.weight", torch.zeros(128, 32, dtype=torch.uint8)),
        "mixes NVFP4 ({f}: blocks.2.ffn.0.weight: uint8) and FP8"),
    "an E5M2 weight": (lambda sd: sd.__setitem__("blocks.0.ffn.2.weight", sd["blocks.0.ffn.2.weight"].float().to(torch.float8_e5m2)),
                       "{f}: blocks.0.ffn.2.weight: dtype float8_e5m2; only E4M3"),
}


@pytest.mark.parametrize("case", list(LX_CASES))
def test_bad_lightx2v_fp8_tensor_is_named(case, lx_src, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(lx_src, src)
    fn, needle = LX_CASES[case]
    edit_safetensors(src / LX_LOW, fn)
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert needle.format(f=src / LX_LOW) in err, err


COMFY_CASES = {
    "E5M2 layer": (lambda sd: sd.__setitem__("blocks.1.ffn.0.comfy_quant", comfy_marker("float8_e5m2")),
                   "{f}: blocks.1.ffn.0.comfy_quant: format 'float8_e5m2'; an FP8 checkpoint's layers must be float8_e4m3fn"),
    "scale per row": (lambda sd: sd.__setitem__("blocks.0.cross_attn.v.weight_scale", torch.ones(64, 1)),
                      "{f}: blocks.0.cross_attn.v.weight_scale: shape [64, 1], expected a scalar"),
    "zero scale": (lambda sd: sd.__setitem__("blocks.0.cross_attn.v.weight_scale", torch.tensor(0.0)),
                   "{f}: blocks.0.cross_attn.v.weight_scale: 0.0 is not a positive finite scale"),
    "infinite input scale": (lambda sd: sd.__setitem__("blocks.2.self_attn.q.input_scale", torch.tensor(float("inf"))),
                             "{f}: blocks.2.self_attn.q.input_scale: inf is not a positive finite scale"),
    "marker on a BF16 weight": (lambda sd: sd.__setitem__("blocks.2.self_attn.q.weight",
                                                          sd["blocks.2.self_attn.q.weight"].to(torch.bfloat16)),
                                "{f}: blocks.2.self_attn.q.weight: dtype bfloat16, expected float8_e4m3fn"),
}


@pytest.mark.parametrize("case", list(COMFY_CASES))
def test_bad_comfy_fp8_tensor_is_named(case, comfy_src, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(comfy_src, src)
    fn, needle = COMFY_CASES[case]
    edit_safetensors(src / CF_HIGH, fn)
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert needle.format(f=src / CF_HIGH) in err, err


def test_experts_in_different_precisions_are_refused(lx_src, tiny_checkpoint, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copyfile(lx_src / LX_HIGH, mixed / LX_HIGH)
    nvfp4 = write_lightx2v(tiny_checkpoint, tmp_path / "nvfp4")
    shutil.copyfile(nvfp4 / "low_nvfp4.safetensors", mixed / "low_nvfp4.safetensors")
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(mixed), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{mixed}: the experts are in different formats (lightx2v FP8, lightx2v NVFP4)" in err


def test_a_producer_without_fp8_and_a_precision_mismatch_are_refused(lx_src, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(lx_src), str(dest), "--format", "modelopt", "--base", str(tiny_checkpoint)], dest)
    assert "--format modelopt: modelopt's FP8 checkpoints are not supported (FP8 imports: lightx2v, comfy)" in err
    with pytest.raises(SourceError, match=r"holds an FP8 checkpoint, but nvfp4 was asked for"):
        import_checkpoint(lx_src, dest, base=tiny_checkpoint, progress=False, precision="nvfp4")
    assert not dest.exists()


def test_fp8_in_diffusers_names_is_an_unknown_fp8_format(tiny_fp8_checkpoint, tmp_path, capsys):
    """gpubake's own fp8 checkpoint (per-row weight_scale, diffusers names) is not another tool's."""
    src = tmp_path / "src"
    src.mkdir()
    for expert, word in zip(EXPERTS, ("high", "low")):
        shutil.copyfile(tiny_fp8_checkpoint / expert / W, src / f"{word}.safetensors")
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_fp8_checkpoint)], dest)
    assert f"{src / 'high.safetensors'}: unknown FP8 format (not LightX2V's or ComfyUI's)" in err


def test_producer_table_and_spec_agree():
    from typing import get_args

    from gpubake.images.spec import Model
    from gpubake.provisioning.bake import import_precisions

    assert get_args(Model.model_fields["format"].annotation)[0].__args__ == detect.NAMES  # the schema's choices
    assert {n: import_precisions(n) for n in detect.NAMES} == {
        "lightx2v": ("nvfp4", "fp8"), "modelopt": ("nvfp4",), "comfy": ("nvfp4", "fp8")}
