"""Wan's original names -> diffusers' (diffusers' own conversion), and finding the experts."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from gpubake.provisioning.importers.source import HIGH, LOW, SourceError, discover
from gpubake.provisioning.importers.wan_names import NamingError, normalize, to_original

W = "diffusion_pytorch_model.safetensors"

# Wan's original key names (Wan2.1/2.2 `WanModel` state dict) and diffusers' for them
KNOWN = {
    "blocks.0.self_attn.q.weight": "blocks.0.attn1.to_q.weight",
    "blocks.0.self_attn.o.bias": "blocks.0.attn1.to_out.0.bias",
    "blocks.0.self_attn.norm_k.weight": "blocks.0.attn1.norm_k.weight",
    "blocks.3.cross_attn.v.weight": "blocks.3.attn2.to_v.weight",
    "blocks.3.cross_attn.k_img.weight": "blocks.3.attn2.add_k_proj.weight",  # I2V
    "blocks.3.cross_attn.norm_k_img.weight": "blocks.3.attn2.norm_added_k.weight",
    "blocks.1.norm3.weight": "blocks.1.norm2.weight",  # Wan's cross-attention norm is norm3
    "blocks.1.ffn.0.weight": "blocks.1.ffn.net.0.proj.weight",
    "blocks.1.ffn.2.bias": "blocks.1.ffn.net.2.bias",
    "blocks.1.modulation": "blocks.1.scale_shift_table",
    "head.modulation": "scale_shift_table",
    "head.head.weight": "proj_out.weight",
    "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
    "time_projection.1.bias": "condition_embedder.time_proj.bias",
    "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
    "img_emb.proj.1.weight": "condition_embedder.image_embedder.ff.net.0.proj.weight",
    "patch_embedding.weight": "patch_embedding.weight",
    # per-layer suffixes of quantized checkpoints ride along
    "blocks.2.self_attn.q.weight_scale_2": "blocks.2.attn1.to_q.weight_scale_2",
    "blocks.2.cross_attn.o.alpha": "blocks.2.attn2.to_out.0.alpha",
    "blocks.2.ffn.2.comfy_quant": "blocks.2.ffn.net.2.comfy_quant",
}


def test_original_names_map_as_diffusers_maps_them():
    assert normalize(list(KNOWN)) == {d: o for o, d in KNOWN.items()}
    prefixed = normalize([f"model.diffusion_model.{k}" for k in KNOWN])
    assert prefixed == {d: f"model.diffusion_model.{o}" for o, d in KNOWN.items()}


def test_diffusers_names_pass_through_and_every_tiny_key_round_trips(tiny_checkpoint):
    with safe_open(str(tiny_checkpoint / "transformer" / W), framework="pt") as f:
        keys = list(f.keys())
    assert normalize(keys) == {k: k for k in keys}  # norm2/norm3 are not swapped twice
    orig = to_original(keys)
    assert sorted(orig.values()) == sorted(keys)
    assert normalize(list(orig)) == {d: o for o, d in orig.items()}
    assert "blocks.0.norm3.weight" in orig and "head.modulation" in orig


def test_mixed_or_unknown_names_are_refused():
    with pytest.raises(NamingError, match="mixes Wan's original names"):
        normalize(["blocks.0.self_attn.q.weight", "blocks.0.attn1.to_k.weight"])
    with pytest.raises(NamingError, match="no Wan transformer tensor names"):
        normalize(["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(NamingError, match="same tensor once the prefix is dropped"):
        normalize(["blocks.0.self_attn.q.weight", "model.diffusion_model.blocks.0.self_attn.q.weight"])


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def test_experts_are_found_by_folder_or_by_word(tmp_path):
    a = tmp_path / "a"
    _touch(a, "Wan2_2-T2V-A14B-LOW_nvfp4.safetensors", "Wan2_2-T2V-A14B-HIGH_nvfp4.safetensors", "README.md")
    src = discover(a)
    assert src.layout == "files"
    assert [p.name for p in src.experts[HIGH].files] == ["Wan2_2-T2V-A14B-HIGH_nvfp4.safetensors"]
    assert [p.name for p in src.experts[LOW].files] == ["Wan2_2-T2V-A14B-LOW_nvfp4.safetensors"]
    b = tmp_path / "b"
    _touch(b, "high_noise_model/x-00001-of-00002.safetensors", "high_noise_model/x-00002-of-00002.safetensors",
           "low_noise_model/y.safetensors")
    src = discover(b)
    assert src.layout == "original-folders" and len(src.experts[HIGH].files) == 2
    c = tmp_path / "c"
    _touch(c, "wan2.2_ti2v_5B_nvfp4.safetensors")
    assert list(discover(c).experts) == [HIGH] and discover(c / "wan2.2_ti2v_5B_nvfp4.safetensors").layout == "single"
    d = tmp_path / "d"
    _touch(d, "highres_a.safetensors", "b_low.safetensors")
    with pytest.raises(SourceError, match="highres_a.safetensors: cannot tell which expert"):
        discover(d)
    e = tmp_path / "e"
    _touch(e, "high_noise_model/x.safetensors")
    with pytest.raises(SourceError, match="low_noise_model: missing"):
        discover(e)
