"""gpubake import of LightX2V's NVFP4 checkpoints: exact conversion, self-test, both forms.

The fixture is written from LightX2V's source (tests/producer_fixtures.py cites each
step: tools/convert/quant/quant.py, lightx2v_kernel/test/nvfp4_nvfp4/fake_quant.py and
test_bench1.py, lightx2v/common/ops/mm/mm_weight.py, lightx2v/models/networks/base_model.py);
LightX2V is not on PyPI and its quantizer is a CUDA kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from producer_fixtures import assert_cpu_selftest_passes, block_linears, float_bits, lightx2v_weight, write_lightx2v
from safetensors.torch import load_file, save_file

from gpubake.cli import _run
from gpubake.kernels.format import NVFP4Tensor, dequantize_ref
from gpubake.provisioning.importers.convert import import_checkpoint
from gpubake.provisioning.importers.wan_names import to_original
from gpubake.provisioning.manifest import read_manifest, verify_tree

W = "diffusion_pytorch_model.safetensors"
FILES = {"transformer": "high_nvfp4.safetensors", "transformer_2": "low_nvfp4.safetensors"}


@pytest.fixture(scope="module")
def lx_source(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_lightx2v(tiny_checkpoint, tmp_path_factory.mktemp("lx") / "src")


@pytest.fixture(scope="module")
def lx_imported(lx_source, tiny_checkpoint, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("lx") / "imported"
    import_checkpoint(lx_source, dest, base=tiny_checkpoint, progress=False)
    return dest


def _gpubake_weight(out: dict[str, torch.Tensor], module: str, shape) -> torch.Tensor:
    q = NVFP4Tensor(out[f"{module}.weight_packed"], out[f"{module}.weight_scale"],
                    out[f"{module}.weight_global_scale"], torch.Size(shape))
    return dequantize_ref(q, torch.float32)


def test_cli_import_then_selftest_passes(lx_source, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    assert _run(["import", str(lx_source), str(dest), "--base", str(tiny_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "lightx2v" and out["quantized_layers"] == 60 and out["exact_layers"] == 60
    assert out["activation_scales"] == 60 and out["model_id"] == "tiny-wan2.2"
    assert_cpu_selftest_passes(dest, tmp_path / "selftest.json")


def test_dequantization_equals_lightx2vs_bit_for_bit(lx_source, lx_imported, tiny_checkpoint):
    """For every quantized linear, the weight LightX2V's GEMM multiplies by (its codes, its
    swizzled scales, bf16(alpha) * bf16(input_global_scale)) equals gpubake's dequantization."""
    manifest = read_manifest(lx_imported)
    for expert, fname in FILES.items():
        src = load_file(str(lx_source / fname))
        out = load_file(str(lx_imported / expert / W))
        orig = {v: k for k, v in to_original([f"{m}.weight" for m in block_linears()]).items()}
        for module in block_linears():
            shape = tuple(load_file(str(tiny_checkpoint / expert / W))[f"{module}.weight"].shape)
            o_mod = orig[f"{module}.weight"][: -len(".weight")]
            ref = lightx2v_weight(src, o_mod, *shape)
            got = _gpubake_weight(out, module, shape)
            assert torch.equal(float_bits(got), float_bits(ref)), module
            assert out[f"{module}.weight_packed"].equal(src[f"{o_mod}.weight"])  # already low nibble first
            igs = src[f"{o_mod}.input_global_scale"].to(torch.bfloat16).float()
            assert out[f"{module}.input_global_scale"].dtype == torch.float32
            assert float(out[f"{module}.input_global_scale"]) == float((1.0 / igs.double()).float())
            assert torch.equal(out[f"{module}.bias"], src[f"{o_mod}.bias"])
            entry = manifest["quantization"]["layers"][f"{expert}/{module}"]
            assert entry["exact"] is True and entry["source_values"]["lightx2v_input_global_scale"] == float(igs)
        for kept in ("patch_embedding.weight", "proj_out.weight", "blocks.0.norm2.weight", "scale_shift_table",
                     "condition_embedder.time_embedder.linear_1.weight"):
            (o,) = to_original([kept])
            assert torch.equal(out[kept], src[o]), kept


def test_manifest_records_source_format_hashes_and_layers(lx_source, lx_imported):
    m = read_manifest(lx_imported)
    verify_tree(lx_imported)
    assert m["format"] == "nvfp4" and m["model_id"] == "tiny-wan2.2"
    assert m["source"]["format"] == "lightx2v" and m["source"]["layout"] == "files"
    assert m["source"]["experts"] == {"transformer": ["high_nvfp4.safetensors"], "transformer_2": ["low_nvfp4.safetensors"]}
    import hashlib

    for rel, entry in m["source"]["files"].items():
        assert hashlib.sha256((lx_source / rel).read_bytes()).hexdigest() == entry["sha256"]
    assert m["base"]["files"]["model_index.json"]["sha256"]
    q = m["quantization"]
    assert q["imported_from"] == "lightx2v" and q["summary"]["quantized_layers"] == 60
    layer = q["layers"]["transformer_2/blocks.2.ffn.net.2"]
    assert layer["shape"] == [64, 128] and layer["nan_blocks"] == 0 and 0 < layer["amax"] < 1


def test_converter_form_sharded_folders(tiny_checkpoint, tmp_path):
    """LightX2V's converter output (weight_global_scale, no activation scale) in Wan's
    high_noise_model/ low_noise_model/ folders of two shards: 1/weight_global_scale is stored,
    rounded once where it is not a float32, and such layers are recorded as not exact."""
    src = write_lightx2v(tiny_checkpoint, tmp_path / "src", form="weight_global_scale", sharded=True)
    dest = tmp_path / "out"
    res = import_checkpoint(src, dest, base=tiny_checkpoint, progress=False)
    assert res["activation_scales"] == 0
    m = read_manifest(dest)
    assert m["source"]["layout"] == "original-folders"
    assert len(m["source"]["experts"]["transformer"]) == 2
    shards = {}
    for f in sorted((src / "high_noise_model").glob("*.safetensors")):
        shards.update(load_file(str(f)))
    out = load_file(str(dest / "transformer" / W))
    orig = {v: k for k, v in to_original([f"{mm}.weight" for mm in block_linears()]).items()}
    inexact = 0
    for module in block_linears():
        o_mod = orig[f"{module}.weight"][: -len(".weight")]
        wgs = shards[f"{o_mod}.weight_global_scale"].to(torch.bfloat16).double()
        g = out[f"{module}.weight_global_scale"]
        assert float(g) == float((1.0 / wgs).float())
        exact = float(g.double() * wgs) == 1.0
        assert m["quantization"]["layers"][f"transformer/{module}"]["exact"] is exact
        inexact += not exact
        shape = (out[f"{module}.weight_packed"].shape[0], out[f"{module}.weight_packed"].shape[1] * 2)
        ref, got = lightx2v_weight(shards, o_mod, *shape), _gpubake_weight(out, module, shape)
        ulps = (float_bits(ref).long() - float_bits(got).long()).abs().max()
        assert ulps <= (0 if exact else 1), module
    assert res["inexact_layers"] >= inexact > 0  # 2688/amax is seldom a power of two


def _rewrite(path: Path, **changes) -> None:
    sd = load_file(str(path))
    for k, v in changes.items():
        sd[k.replace("__", ".")] = v
    save_file(sd, str(path))


def test_alpha_inconsistent_with_the_scales_is_refused(lx_source, tiny_checkpoint, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(lx_source, src)
    sd = load_file(str(src / "low_nvfp4.safetensors"))
    p = "blocks.1.cross_attn.v"
    wgs = 1.0 / (sd[f"{p}.alpha"].double() * sd[f"{p}.input_global_scale"].double())
    sd[f"{p}.weight_global_scale"] = (wgs * 2).float()  # says the weight scale is half what alpha implies
    save_file(sd, str(src / "low_nvfp4.safetensors"))
    dest = tmp_path / "out"
    assert _run(["import", str(src), str(dest), "--base", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'low_nvfp4.safetensors'}: {p}.alpha" in " ".join(err.split())
    assert "inconsistent with input_global_scale" in err and "Traceback" not in err
    assert not dest.exists() and not list(tmp_path.glob(".out*"))
    sd[f"{p}.weight_global_scale"] = wgs.float()  # consistent: accepted, and alpha still rules
    save_file(sd, str(src / "low_nvfp4.safetensors"))
    assert _run(["import", str(src), str(dest), "--base", str(tiny_checkpoint)]) == 0
