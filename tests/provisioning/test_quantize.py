"""quantize: which tensors become NVFP4, what the manifest records, and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpubake.errors import GpubakeError
from gpubake.kernels.format import NVFP4Tensor, dequantize_ref
from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_tree
from gpubake.provisioning.policy import PolicyError, get_policy
from gpubake.provisioning.quantize import quantize_checkpoint

W = "diffusion_pytorch_model.safetensors"
QUANTIZED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def test_quantized_and_kept_tensors(tiny_checkpoint, tiny_nvfp4_checkpoint):
    src = load_file(str(tiny_checkpoint / "transformer" / W))
    out = load_file(str(tiny_nvfp4_checkpoint / "transformer" / W))
    for b in range(3):
        for lin in QUANTIZED:
            p = f"blocks.{b}.{lin}"
            assert f"{p}.weight" not in out
            assert out[f"{p}.weight_packed"].dtype == torch.uint8
            assert out[f"{p}.weight_scale"].dtype == torch.float8_e4m3fn
            assert out[f"{p}.weight_global_scale"].shape == ()
            assert torch.equal(out[f"{p}.bias"], src[f"{p}.bias"])
    for kept in ("patch_embedding.weight", "proj_out.weight", "scale_shift_table", "blocks.0.scale_shift_table",
                 "condition_embedder.time_embedder.linear_1.weight", "condition_embedder.text_embedder.linear_1.weight",
                 "condition_embedder.time_proj.weight", "blocks.0.attn1.norm_q.weight"):
        assert torch.equal(out[kept], src[kept]), kept


def test_dequantized_weights_are_close_and_sqnr_is_recorded(tiny_checkpoint, tiny_nvfp4_checkpoint):
    src = load_file(str(tiny_checkpoint / "transformer_2" / W))
    out = load_file(str(tiny_nvfp4_checkpoint / "transformer_2" / W))
    p = "blocks.1.ffn.net.0.proj"
    w = src[f"{p}.weight"].float()
    q = NVFP4Tensor(out[f"{p}.weight_packed"], out[f"{p}.weight_scale"], out[f"{p}.weight_global_scale"], w.shape)
    err = (dequantize_ref(q, torch.float32) - w).norm() / w.norm()
    assert 0 < err < 0.15  # 4-bit: ~10% relative error on Gaussian weights, never exact
    layers = read_manifest(tiny_nvfp4_checkpoint)["quantization"]["layers"]
    assert len(layers) == 2 * 3 * len(QUANTIZED)
    recorded = layers[f"transformer_2/{p}"]["sqnr_db"]
    assert recorded == pytest.approx(-20 * torch.log10(err).item(), abs=0.01)
    assert all(15 < v["sqnr_db"] < 25 for v in layers.values())


def test_row_chunked_quantization_is_bit_identical_to_one_call(monkeypatch):
    """quantize_weight bounds memory by quantizing row chunks with the whole tensor's
    global scale; that must not change a single byte."""
    from gpubake.kernels.format import quantize_ref
    from gpubake.provisioning import quantize as qmod

    monkeypatch.setattr(qmod, "ROWS_PER_CHUNK", 7)  # uneven chunks, last one short
    w = (torch.randn(50, 64) * torch.logspace(-3, 2, 50).unsqueeze(1)).to(torch.bfloat16)
    q, s = qmod.quantize_weight(w)
    ref = quantize_ref(w)
    assert torch.equal(q.data, ref.data) and torch.equal(q.global_scale, ref.global_scale)
    assert torch.equal(q.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
    err = (dequantize_ref(ref, torch.float32) - w.float()).pow(2).sum() / w.float().pow(2).sum()
    assert s == pytest.approx(-10 * torch.log10(err).item(), abs=1e-3)


def test_manifest_records_source_policy_and_files(tiny_checkpoint, tiny_nvfp4_checkpoint):
    m = read_manifest(tiny_nvfp4_checkpoint)
    assert m["format"] == "nvfp4" and m["model_id"] == "tiny-wan2.2" and m["tool_version"]
    assert m["source"]["manifest_sha256"] == sha256_file(tiny_checkpoint / MANIFEST_NAME)
    assert m["source"]["files"] == read_manifest(tiny_checkpoint)["files"]
    assert m["quantization"]["policy"]["name"] == "default"
    verify_tree(tiny_nvfp4_checkpoint)
    for comp in ("vae", "text_encoder", "tokenizer", "scheduler"):  # copied byte for byte
        for f in (tiny_checkpoint / comp).iterdir():
            assert (tiny_nvfp4_checkpoint / comp / f.name).read_bytes() == f.read_bytes()
    assert (tiny_nvfp4_checkpoint / "transformer" / W).stat().st_size < (tiny_checkpoint / "transformer" / W).stat().st_size


def test_quantize_is_deterministic(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path):
    again = tmp_path / "again"
    quantize_checkpoint(tiny_checkpoint, again, progress=False)
    assert (again / MANIFEST_NAME).read_bytes() == (tiny_nvfp4_checkpoint / MANIFEST_NAME).read_bytes()


def test_keep_first_last_policy(tiny_checkpoint, tmp_path):
    res = quantize_checkpoint(tiny_checkpoint, tmp_path / "kfl", policy="keep-first-last", progress=False)
    assert res["quantized_layers"] == 2 * len(QUANTIZED)  # only block 1 of 0..2, in both experts
    with safe_open(str(tmp_path / "kfl" / "transformer" / W), "pt") as f:
        keys = set(f.keys())
    assert "blocks.0.attn1.to_q.weight" in keys and "blocks.2.ffn.net.2.weight" in keys
    assert "blocks.1.attn2.to_k.weight_packed" in keys and "blocks.1.attn2.to_k.weight" not in keys


def test_policy_matching():
    ffn = get_policy("ffn-only")
    assert ffn.quantizes("blocks.3.ffn.net.2", 40) and not ffn.quantizes("blocks.3.attn1.to_q", 40)
    kfl = get_policy("keep-first-last")
    assert not kfl.quantizes("blocks.39.attn1.to_q", 40) and kfl.quantizes("blocks.38.attn1.to_q", 40)
    assert not get_policy("default").quantizes("proj_out", 40)
    assert get_policy("default").quantizes("blocks.0.attn2.add_k_proj", 40)  # I2V cross-attention image k/v
    with pytest.raises(PolicyError, match="unknown policy 'int3'.*default"):
        get_policy("int3")


def test_sharded_source(tiny_checkpoint, tmp_path):
    """A source split in two shards with an index (as the real 12-shard experts) keeps its sharding."""
    src = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, src)
    (src / MANIFEST_NAME).unlink()
    for comp in ("transformer", "transformer_2"):
        sd = load_file(str(src / comp / W))
        keys = sorted(sd)
        halves = {"part-00001-of-00002.safetensors": keys[: len(keys) // 2], "part-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, ks in halves.items():
            save_file({k: sd[k] for k in ks}, str(src / comp / name))
        (src / comp / W).unlink()
        (src / comp / f"{W}.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    quantize_checkpoint(src, tmp_path / "q", progress=False, trust_source=True)  # no manifest: trusted
    out = tmp_path / "q" / "transformer"
    idx = json.loads((out / f"{W}.index.json").read_text())
    assert set(idx["weight_map"].values()) == {"part-00001-of-00002.safetensors", "part-00002-of-00002.safetensors"}
    assert "blocks.0.attn1.to_q.weight_packed" in idx["weight_map"]
    assert read_manifest(tmp_path / "q")["source"]["manifest_sha256"] is None  # hashed here instead
    assert read_manifest(tmp_path / "q")["source"]["verified"] == "trusted"


def _broken_copy(tiny_checkpoint: Path, tmp_path: Path, edit) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    sd = load_file(str(src / "transformer" / W))
    edit(sd)
    save_file(sd, str(src / "transformer" / W))
    return src


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda sd: sd.pop("blocks.1.attn2.to_v.weight"), "missing tensor 'blocks.1.attn2.to_v.weight'"),
        (lambda sd: sd.__setitem__("blocks.7.extra.weight", torch.zeros(4)), "unexpected tensor 'blocks.7.extra.weight'"),
        (lambda sd: sd.__setitem__("proj_out.weight", torch.zeros(3, 64)), r"'proj_out.weight' has shape \[3, 64\]"),
    ],
)
def test_not_wan_shaped_tensors_are_refused(tiny_checkpoint, tmp_path, edit, pattern):
    src = _broken_copy(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError, match=pattern) as exc:
        quantize_checkpoint(src, tmp_path / "out", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [src]


def test_not_a_wan_checkpoint(tmp_path, tiny_checkpoint):
    src = tmp_path / "sd"
    shutil.copytree(tiny_checkpoint, src)
    idx = json.loads((src / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionPipeline"
    (src / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="not a Wan pipeline"):
        quantize_checkpoint(src, tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json: missing"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "out3", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out3").exists()


def test_refuses_an_already_quantized_source(tiny_nvfp4_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(tiny_nvfp4_checkpoint, tmp_path / "twice", progress=False)


def test_disk_full_leaves_nothing(tiny_checkpoint, small_fs):
    with pytest.raises(GpubakeError, match="no space left") as exc:
        quantize_checkpoint(tiny_checkpoint, small_fs / "q", progress=False)
    assert "\n" not in str(exc.value)
    assert list(small_fs.iterdir()) == []
