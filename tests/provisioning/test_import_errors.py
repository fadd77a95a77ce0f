"""gpubake import refuses bad input in one line naming the file and key, exits 2, and leaves
nothing at DEST (nor beside it); a remote SRC goes through fetch and its verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from producer_fixtures import write_comfy, write_lightx2v

from gpubake.cli import _run
from gpubake.provisioning.manifest import build_manifest, read_manifest, write_manifest
from testutil import edit_safetensors, import_refused

W = "diffusion_pytorch_model.safetensors"
HIGH = "wan2.2_t2v_tiny_high_noise_nvfp4.safetensors"
LOW = "wan2.2_t2v_tiny_low_noise_nvfp4.safetensors"


@pytest.fixture(scope="module")
def comfy_src(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_comfy(tiny_checkpoint, tmp_path_factory.mktemp("err") / "comfy")


@pytest.fixture(scope="module")
def lx_src(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_lightx2v(tiny_checkpoint, tmp_path_factory.mktemp("err") / "lx")


def _put(sd, key, value):
    sd[key] = value


CASES = {
    "missing quantized part": (lambda sd: sd.pop("blocks.1.self_attn.q.weight_scale_2"),
                               "{f}: missing tensor blocks.1.self_attn.q.weight_scale_2 of a comfy NVFP4 layer"),
    "missing kept tensor": (lambda sd: sd.pop("head.head.weight"),
                            "{f}: missing tensor head.head.weight (proj_out.weight in diffusers' names) (shape [64, 64])"),
    "extra part": (lambda sd: _put(sd, "blocks.0.self_attn.q.smooth_scale", torch.ones(64)),
                   "{f}: blocks.0.self_attn.q.smooth_scale: unexpected tensor for a comfy NVFP4 layer"),
    "extra module": (lambda sd: _put(sd, "blocks.7.ffn.0.weight", torch.ones(128, 64, dtype=torch.bfloat16)),
                     "{f}: blocks.7.ffn.0.weight: unexpected tensor ('blocks.7.ffn.net.0.proj.weight' is not in "
                     "WanTransformer3DModel"),
    "row-major scales": (lambda sd: _put(sd, "blocks.0.self_attn.q.weight_scale",
                                         sd["blocks.0.self_attn.q.weight_scale"][:64].contiguous()),
                         "{f}: blocks.0.self_attn.q.weight_scale: shape [64, 4], expected [128, 4]"),
    "wrong dtype": (lambda sd: _put(sd, "blocks.2.cross_attn.o.weight_scale_2", torch.tensor(3, dtype=torch.int32)),
                    "{f}: blocks.2.cross_attn.o.weight_scale_2: dtype int32, expected float32 or bfloat16 or float16"),
    "NaN global scale": (lambda sd: _put(sd, "blocks.2.ffn.2.weight_scale_2", torch.tensor(float("nan"))),
                         "{f}: blocks.2.ffn.2.weight_scale_2: nan is not a non-negative finite scale"),
    "kept tensor reshaped": (lambda sd: _put(sd, "patch_embedding.weight", torch.ones(64, 16, 1, 2, 1)),
                             "{f}: patch_embedding.weight: shape [64, 16, 1, 2, 1], expected [64, 16, 1, 2, 2]"),
    "packed weight missing": (lambda sd: sd.pop("blocks.0.ffn.2.weight"),
                              "{f}: missing tensor blocks.0.ffn.2.weight of a comfy NVFP4 layer"),
    "quantized bias missing": (lambda sd: sd.pop("blocks.0.ffn.2.bias"),
                               "{f}: missing tensor blocks.0.ffn.2.bias (blocks.0.ffn.net.2.bias in diffusers' names)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_comfy_tensor_is_named(case, comfy_src, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(comfy_src, src)
    fn, needle = CASES[case]
    edit_safetensors(src / LOW, fn)
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert needle.format(f=src / LOW) in err


def test_negative_alpha_is_named(lx_src, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(lx_src, src)
    edit_safetensors(src / "high_nvfp4.safetensors", lambda sd: sd["blocks.0.ffn.0.alpha"].neg_())
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{src / 'high_nvfp4.safetensors'}: blocks.0.ffn.0.alpha: -" in err and "not a positive finite scale" in err


def test_lightx2v_without_its_scalars_is_named(lx_src, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(lx_src, src)
    edit_safetensors(src / "high_nvfp4.safetensors", lambda sd: sd.pop("blocks.1.cross_attn.k.input_global_scale"))
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{src / 'high_nvfp4.safetensors'}: missing tensor blocks.1.cross_attn.k.input_global_scale of a lightx2v" in err


def test_source_failing_its_manifest_is_refused(comfy_src, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(comfy_src, src)
    write_manifest(src, build_manifest(src, fmt="unknown"))  # what fetch leaves beside the files
    data = bytearray((src / HIGH).read_bytes())
    data[-10] ^= 0x01  # a flipped bit in tensor data: the header still parses
    (src / HIGH).write_bytes(bytes(data))
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{src / HIGH}: sha256" in err and "does not match" in err


def test_base_failing_its_manifest_is_refused(comfy_src, tiny_checkpoint, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    (base / "vae" / "config.json").write_text((base / "vae" / "config.json").read_text() + " ")
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(comfy_src), str(dest), "--base", str(base)], dest)
    assert f"{base / 'vae' / 'config.json'}: sha256" in err


def test_unknown_and_unquantized_sources(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "bf16"
    src.mkdir()
    shutil.copyfile(tiny_checkpoint / "transformer" / W, src / "high.safetensors")
    shutil.copyfile(tiny_checkpoint / "transformer_2" / W, src / "low.safetensors")
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(src), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{src / 'high.safetensors'}: no NVFP4 or FP8 tensors" in err and "gpubake quantize" in err
    err = import_refused(capsys, [str(src), str(dest), "--format", "gguf"], dest)
    assert "--format: unknown format 'gguf' (auto, lightx2v, modelopt, comfy)" in err


def test_forced_format_that_does_not_match(comfy_src, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(comfy_src), str(dest), "--format", "modelopt", "--base", str(tiny_checkpoint)], dest)
    assert "blocks.0.self_attn.k.comfy_quant: unexpected tensor for a modelopt NVFP4 layer" in err


def test_layout_errors(comfy_src, lx_src, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    err = import_refused(capsys, [str(tmp_path / "absent"), str(dest)], dest)
    assert f"SRC {tmp_path / 'absent'}: no such file or folder" in err
    err = import_refused(capsys, [str(lx_src), str(dest)], dest)
    assert f"{lx_src}: holds only the transformer weights; pass --base" in err
    odd = tmp_path / "odd"
    shutil.copytree(comfy_src, odd)
    shutil.copyfile(odd / HIGH, odd / "wan2.2_extra.safetensors")
    err = import_refused(capsys, [str(odd), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{odd / 'wan2.2_extra.safetensors'}: cannot tell which expert" in err
    one = tmp_path / "one"
    one.mkdir()
    shutil.copyfile(comfy_src / HIGH, one / HIGH)
    err = import_refused(capsys, [str(one), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert "holds 1 expert (transformer), but" in err and "has 2 experts (transformer, transformer_2)" in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copyfile(comfy_src / HIGH, mixed / HIGH)
    shutil.copyfile(lx_src / "low_nvfp4.safetensors", mixed / "low_nvfp4.safetensors")
    err = import_refused(capsys, [str(mixed), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert "the experts are in different formats (comfy NVFP4, lightx2v NVFP4)" in err
    junk = tmp_path / "junk"
    shutil.copytree(comfy_src, junk)
    (junk / LOW).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    err = import_refused(capsys, [str(junk), str(dest), "--base", str(tiny_checkpoint)], dest)
    assert f"{junk / LOW}: unreadable safetensors" in err


def test_dest_not_empty_is_refused(comfy_src, tiny_checkpoint, tmp_path, capsys):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert _run(["import", str(comfy_src), str(dest), "--base", str(tiny_checkpoint)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_https_source_is_fetched_verified_and_imported(comfy_src, tiny_checkpoint, http_server, tmp_path, capsys):
    for f in comfy_src.iterdir():
        shutil.copyfile(f, http_server.root / f.name)
    write_manifest(http_server.root, build_manifest(http_server.root, fmt="unknown"))
    dest = tmp_path / "model"
    assert _run(["import", http_server.url, str(dest), "--base", str(tiny_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "comfy" and out["quantized_layers"] == 60
    m = read_manifest(dest)
    assert m["source"]["uri"] == http_server.url and m["source"]["verified"] == "manifest"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]  # the fetched copy is gone
    http_server.faults.flip.add(HIGH)  # the server now sends corrupt bytes: fetch refuses them
    dest2 = tmp_path / "model2"
    err = import_refused(capsys, [http_server.url, str(dest2), "--base", str(tiny_checkpoint)], dest2)
    assert HIGH in err and "sha256" in err
