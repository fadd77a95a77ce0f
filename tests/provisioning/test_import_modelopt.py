"""gpubake import of NVIDIA ModelOpt's NVFP4 export, made by nvidia-modelopt itself on the CPU.

The fixture is the tiny WanPipeline quantized (`mtq.quantize`, NVFP4_DEFAULT_CFG, ModelOpt's
Wan filter) and exported (`export_hf_checkpoint`, sharded) by ModelOpt: diffusers layout,
every component, `weight`/`weight_scale`/`weight_scale_2`/`input_scale` per linear.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from producer_fixtures import assert_cpu_selftest_passes, float_bits, write_modelopt
from safetensors.torch import load_file

from gpubake.cli import _run
from gpubake.kernels.format import NVFP4Tensor, dequantize_ref
from gpubake.provisioning.importers.convert import import_checkpoint
from gpubake.provisioning.manifest import read_manifest

W = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def mo_source(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_modelopt(tiny_checkpoint, tmp_path_factory.mktemp("mo") / "src", max_shard_size="100KB")


@pytest.fixture(scope="module")
def mo_imported(mo_source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("mo") / "imported"
    import_checkpoint(mo_source, dest, model_id="tiny-wan2.2", progress=False)
    return dest


def _load_expert(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cli_import_then_selftest_passes(mo_source, tmp_path, capsys):
    assert len(list((mo_source / "transformer").glob("*.safetensors"))) > 1  # ModelOpt sharded it
    dest = tmp_path / "model"
    assert _run(["import", str(mo_source), str(dest), "--model-id", "tiny-wan2.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "modelopt" and out["exact_layers"] == out["quantized_layers"] == 40  # blocks 1, 2
    assert out["activation_scales"] == 40
    assert_cpu_selftest_passes(dest, tmp_path / "selftest.json")


def test_dequantization_equals_modelopts_bit_for_bit(mo_source, mo_imported):
    """ModelOpt's own NVFP4QTensor.dequantize, evaluated exactly (float64: every product of an
    E2M1 value, an E4M3 scale and a float32 global scale is exact there) and rounded once to
    float32, equals gpubake's float32 dequantization for every quantized linear. ModelOpt's
    float32 evaluation rounds weight_scale * weight_scale_2 first: at most 1 ulp away."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    layers = read_manifest(mo_imported)["quantization"]["layers"]
    n = 0
    for expert in ("transformer", "transformer_2"):
        src, out = _load_expert(mo_source / expert), load_file(str(mo_imported / expert / W))
        for key in sorted(k for k in src if k.endswith(".weight_scale_2")):
            m = key[: -len(".weight_scale_2")]
            packed, scale, g = src[f"{m}.weight"], src[f"{m}.weight_scale"], src[f"{m}.weight_scale_2"]
            shape = (packed.shape[0], packed.shape[1] * 2)
            qt = NVFP4QTensor(torch.Size(shape), torch.float64, packed)
            # float64 scales in (ModelOpt keeps a non-E4M3 scale as given): every product exact
            exact = qt.dequantize(dtype=torch.float64, scale=scale.double(), double_scale=g.double().reshape(1, 1),
                                  block_sizes={-1: 16})
            theirs32 = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=g, block_sizes={-1: 16})
            q = NVFP4Tensor(out[f"{m}.weight_packed"], out[f"{m}.weight_scale"], out[f"{m}.weight_global_scale"],
                            torch.Size(shape))
            ours = dequantize_ref(q, torch.float32)
            # equal values; ModelOpt decodes the code 0x8 as +0 (e2m1_values), gpubake as -0
            assert torch.equal(ours, exact.float()), m
            assert torch.equal(float_bits(ours.abs()), float_bits(exact.float().abs())), m
            assert (float_bits(ours.abs()).long() - float_bits(theirs32.abs()).long()).abs().max() <= 1, m
            assert float(out[f"{m}.input_global_scale"]) == float(src[f"{m}.input_scale"])
            assert torch.equal(out[f"{m}.bias"], src[f"{m}.bias"])
            assert layers[f"{expert}/{m}"]["exact"] is True
            n += 1
        for k, t in src.items():
            if not k.rpartition(".")[0] + ".weight_scale_2" in src:
                assert torch.equal(out[k], t), k  # every unquantized tensor copied unchanged
    assert n == 40


def test_components_and_config_come_from_the_export(mo_source, mo_imported):
    for comp in ("text_encoder", "vae", "tokenizer", "scheduler"):
        for f in (mo_source / comp).rglob("*"):
            if f.is_file():
                assert (mo_imported / comp / f.relative_to(mo_source / comp)).read_bytes() == f.read_bytes()
    src_cfg = json.loads((mo_source / "transformer" / "config.json").read_text())
    cfg = json.loads((mo_imported / "transformer" / "config.json").read_text())
    assert src_cfg["quantization_config"]["quant_method"] == "modelopt"
    assert "quantization_config" not in cfg and cfg == {k: v for k, v in src_cfg.items() if k != "quantization_config"}
    m = read_manifest(mo_imported)
    assert m["source"]["layout"] == "diffusers" and m["base"] is None and m["model_id"] == "tiny-wan2.2"
    assert len(m["source"]["experts"]["transformer"]) > 1


def test_quantized_time_embedder_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    """ModelOpt's default config (no Wan filter) also quantizes the condition embedder; a time
    embedder without parameters breaks diffusers' WanTimeTextImageEmbedding, so it is refused."""
    src = write_modelopt(tiny_checkpoint, tmp_path / "src", recipe="default")
    dest = tmp_path / "out"
    assert _run(["import", str(src), str(dest)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{src / 'transformer' / W}: condition_embedder.time_embedder.linear_1.weight" in err
    assert "Traceback" not in err and not dest.exists()
