"""make-tiny: a real diffusers Wan 2.2 layout, loadable by WanPipeline, byte-reproducible."""

from __future__ import annotations

import json

import pytest

from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest, verify_tree
from gpubake.provisioning.tiny import make_tiny


def test_layout_and_manifest(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.875
    for comp in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_checkpoint / comp).is_dir(), comp
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    m = read_manifest(tiny_checkpoint)
    assert m["format"] == "bf16" and m["model_id"] == "tiny-wan2.2"
    verify_tree(tiny_checkpoint)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(tiny_checkpoint) for p in tiny_checkpoint.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_checkpoint / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = read_manifest(make_tiny(tmp_path / "other", seed=1))["files"]
    base = read_manifest(tiny_checkpoint)["files"]
    w = "transformer/diffusion_pytorch_model.safetensors"
    assert other[w]["sha256"] != base[w]["sha256"]
    assert other["tokenizer/tokenizer.json"] == base["tokenizer/tokenizer.json"]


def test_experts_differ_and_are_bf16(tiny_checkpoint):
    from safetensors import safe_open
    import torch

    def get(comp):
        with safe_open(str(tiny_checkpoint / comp / "diffusion_pytorch_model.safetensors"), "pt") as f:
            return f.get_tensor("blocks.0.attn1.to_q.weight")

    a, b = get("transformer"), get("transformer_2")
    assert a.dtype == torch.bfloat16 and not torch.equal(a, b)


def test_wanpipeline_from_pretrained_generates_frames_on_cpu(tiny_checkpoint):
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    ids = pipe.tokenizer("a red cat running on the beach").input_ids
    assert 2 not in ids[:-1] and ids[-1] == 1  # no <unk>, ends with </s>
    out = pipe("a red cat", negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=2,
               guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator().manual_seed(0),
               output_type="np", max_sequence_length=16)
    frames = out.frames[0]
    assert frames.shape == (5, 64, 64, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01


def test_disk_full_leaves_nothing(small_fs):
    from gpubake.errors import GpubakeError

    with pytest.raises(GpubakeError, match="no space left") as exc:
        make_tiny(small_fs / "tiny")
    assert "\n" not in str(exc.value)
    assert list(small_fs.iterdir()) == []


def test_manifest_is_last_and_complete(tiny_checkpoint):
    files = {p.relative_to(tiny_checkpoint).as_posix() for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert files - {MANIFEST_NAME} == set(read_manifest(tiny_checkpoint)["files"])
