"""gpubake import of ComfyUI's NVFP4 checkpoints, quantized by comfy-kitchen itself on the CPU.

Layout per comfy/ops.py (MixedPrecisionOps.Linear.state_dict / _load_from_state_dict):
`weight` (high nibble first), `weight_scale` (swizzled), `weight_scale_2`, optional
`input_scale`, `comfy_quant`; Wan's original names, one file per expert.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from producer_fixtures import (
    assert_cpu_selftest_passes,
    block_linears,
    comfy_marker,
    float_bits,
    with_header_metadata,
    write_comfy,
)
from safetensors.torch import load_file, save_file

from gpubake.cli import _run
from gpubake.kernels.format import NVFP4Tensor, dequantize_ref
from gpubake.provisioning.importers.convert import import_checkpoint
from gpubake.provisioning.importers.wan_names import to_original
from gpubake.provisioning.manifest import read_manifest

W = "diffusion_pytorch_model.safetensors"
FILES = {"transformer": "wan2.2_t2v_tiny_high_noise_nvfp4.safetensors",
         "transformer_2": "wan2.2_t2v_tiny_low_noise_nvfp4.safetensors"}


@pytest.fixture(scope="module")
def comfy_source(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_comfy(tiny_checkpoint, tmp_path_factory.mktemp("comfy") / "src")


@pytest.fixture(scope="module")
def comfy_imported(comfy_source, tiny_checkpoint, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("comfy") / "imported"
    import_checkpoint(comfy_source, dest, base=tiny_checkpoint, progress=False)
    return dest


def _orig(module: str) -> str:
    (o,) = to_original([f"{module}.weight"])
    return o[: -len(".weight")]


def test_cli_import_then_selftest_passes(comfy_source, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    assert _run(["import", str(comfy_source), str(dest), "--base", str(tiny_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "comfy" and out["quantized_layers"] == out["exact_layers"] == 60
    assert out["activation_scales"] == 48  # attention layers carry input_scale, the FFN ones not
    assert_cpu_selftest_passes(dest, tmp_path / "selftest.json")


def test_dequantization_equals_comfy_kitchens_bit_for_bit(comfy_source, comfy_imported):
    """comfy-kitchen's own dequantize_nvfp4 (eager backend: hi-first nibbles, from_blocked
    scales), evaluated exactly in float64 and rounded once, equals gpubake's float32
    dequantization bit for bit; so does its float32 evaluation here (bf16 weights give a
    bf16 weight_scale_2, so per_tensor_scale * block_scale is exact)."""
    from comfy_kitchen.backends.eager.quantization import dequantize_nvfp4

    for expert, fname in FILES.items():
        src, out = load_file(str(comfy_source / fname)), load_file(str(comfy_imported / expert / W))
        for module in block_linears():
            o = _orig(module)
            shape = (src[f"{o}.weight"].shape[0], src[f"{o}.weight"].shape[1] * 2)
            exact = dequantize_nvfp4(src[f"{o}.weight"], src[f"{o}.weight_scale_2"].double(),
                                     src[f"{o}.weight_scale"], torch.float64)
            theirs32 = dequantize_nvfp4(src[f"{o}.weight"], src[f"{o}.weight_scale_2"], src[f"{o}.weight_scale"],
                                        torch.float32)
            q = NVFP4Tensor(out[f"{module}.weight_packed"], out[f"{module}.weight_scale"],
                            out[f"{module}.weight_global_scale"], torch.Size(shape))
            ours = dequantize_ref(q, torch.float32)
            assert torch.equal(float_bits(ours), float_bits(exact.float())), module
            assert torch.equal(float_bits(ours), float_bits(theirs32)), module
            assert float(out[f"{module}.weight_global_scale"]) == float(src[f"{o}.weight_scale_2"])
            if "attn" in module:
                assert float(out[f"{module}.input_global_scale"]) == float(src[f"{o}.input_scale"])
            else:
                assert f"{module}.input_global_scale" not in out
            assert f"{module}.comfy_quant" not in out and torch.equal(out[f"{module}.bias"], src[f"{o}.bias"])


def test_header_metadata_and_prefix_variant_gives_the_same_checkpoint(comfy_source, comfy_imported,
                                                                      tiny_checkpoint, tmp_path):
    """Older ComfyUI files list the quantized layers in the header's `_quantization_metadata`
    instead of `comfy_quant` tensors, and ComfyUI files may carry `model.diffusion_model.`."""
    src = tmp_path / "src"
    src.mkdir()
    for fname in FILES.values():
        with_header_metadata(comfy_source / fname, src / fname, "nvfp4")
    dest = tmp_path / "out"
    import_checkpoint(src, dest, base=tiny_checkpoint, progress=False)
    for expert in FILES:
        a, b = load_file(str(dest / expert / W)), load_file(str(comfy_imported / expert / W))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_manifest(dest)["quantization"]["layers"] == read_manifest(comfy_imported)["quantization"]["layers"]


def test_a_layer_in_another_comfy_format_is_refused(comfy_source, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(comfy_source, src)
    path = src / FILES["transformer"]
    sd = load_file(str(path))
    sd["blocks.2.ffn.0.comfy_quant"] = comfy_marker("int8_tensorwise")
    save_file(sd, str(path))
    dest = tmp_path / "out"
    assert _run(["import", str(src), str(dest), "--base", str(tiny_checkpoint)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}: blocks.2.ffn.0.comfy_quant: format 'int8_tensorwise'; only nvfp4" in err
    assert not dest.exists()


def test_loader_exposes_the_static_activation_scale(comfy_source, comfy_imported):
    """The loader keeps `P.input_global_scale` as an NVFP4Linear buffer (float32, through a
    model-wide dtype cast); layers without one have none."""
    from gpubake.provisioning.loader import load_expert

    model = load_expert(comfy_imported / "transformer")
    src = load_file(str(comfy_source / FILES["transformer"]))
    q = model.get_submodule("blocks.1.attn2.to_k")
    assert q.input_global_scale.dtype == torch.float32 and q.input_global_scale.shape == ()
    assert float(q.input_global_scale) == float(src["blocks.1.cross_attn.k.input_scale"])
    assert model.get_submodule("blocks.1.ffn.net.2").input_global_scale is None
    model.to(torch.float16)
    assert q.input_global_scale.dtype == torch.float32 and q.weight_global_scale.dtype == torch.float32
