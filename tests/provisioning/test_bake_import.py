"""An image whose model is another tool's NVFP4 checkpoint: `images.model_layer.prepare_model`
imports it through `provisioning.bake.import_checkpoint` from two pinned Hub sources (here a
local fake Hub): the LightX2V repo (only the selected expert files) and the diffusers base
(only its non-transformer components and configs)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from producer_fixtures import FP8_FILES, write_lightx2v, write_lightx2v_fp8

from gpubake.errors import GpubakeError, SpecError
from gpubake.images import model_layer
from gpubake.images.spec import load_spec
from gpubake.provisioning import bake
from gpubake.provisioning.manifest import read_manifest, verify_tree

sys.path.insert(0, str(Path(__file__).parents[1] / "images"))
from gpubake_spec_helpers import write_spec  # noqa: E402

LX_REPO = "lightx2v/Tiny-NVFP4-Sparse"
BASE_REPO = "Wan-AI/Tiny-Diffusers"
T2V = ["Wan2.2-T2V-A14B_NVFP4_Sparse_high.safetensors", "Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors"]


@pytest.fixture
def hub(fake_hub, tiny_checkpoint, tmp_path):
    """The fake Hub serving the tiny LightX2V checkpoint under LightX2V's Hub names, beside
    files an import must not fetch (the I2V pair, ComfyUI's copy), and the tiny diffusers base,
    whose transformer weights are corrupted in transit (fetching them fails the build)."""
    lx = write_lightx2v(tiny_checkpoint, tmp_path / "lx-written")
    fake_hub.repo = LX_REPO
    (lx / "high_nvfp4.safetensors").rename(fake_hub.root / T2V[0])
    (lx / "low_nvfp4.safetensors").rename(fake_hub.root / T2V[1])
    for decoy in ("Wan2.2-I2V-A14B_NVFP4_Sparse_high.safetensors", "Wan2.2-T2V-A14B_NVFP4_Sparse_high_comfy.safetensors"):
        shutil.copyfile(fake_hub.root / T2V[0], fake_hub.root / decoy)
    (fake_hub.root / "README.md").write_text("# tiny\n")
    base = tmp_path / "base-repo"
    shutil.copytree(tiny_checkpoint, base, ignore=shutil.ignore_patterns("gpubake-manifest.json"))
    fake_hub.repos[BASE_REPO] = base
    fake_hub.flip.update({"transformer/diffusion_pytorch_model.safetensors",
                          "transformer_2/diffusion_pytorch_model.safetensors"})
    return fake_hub


def _spec(tmp_path: Path, hub, *, source_rev: str | None = None, base_rev: str | None = None,
          quantization: str = "nvfp4", files: list[str] | None = None) -> Path:
    """The catalog's Hopper LightX2V spec (its `files` select the T2V pair) on the fake Hub's repos."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    edits = [
        (r'^id = .*$', 'id = "tiny-wan2.2"'),
        (r'^source = .*$', f'source = "hf://{LX_REPO}@{source_rev or hub.commit}"'),
        (r'^base = .*$', f'base = "hf://{BASE_REPO}@{base_rev or hub.commit}"'),
    ]
    if quantization != "nvfp4":
        edits.append((r'^quantization = .*$', f'quantization = "{quantization}"'))
    if files is not None:
        edits.append((r'^files = .*$', f"files = {json.dumps(files)}"))
    return write_spec(tmp_path, based_on="wan22-t2v-a14b-lightx2v-nvfp4-hopper", edits=edits)


def test_prepare_model_imports_from_both_pinned_sources(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "cache"))
    spec = load_spec(_spec(tmp_path, hub))
    assert (spec.model.format, spec.model.unpinned) == ("lightx2v", [])
    model = model_layer.cached_model(spec)  # what prepare_model stages into a rendered context's layers
    manifest = read_manifest(model)
    verify_tree(model, manifest)
    assert manifest["model_id"] == "tiny-wan2.2" and manifest["format"] == "nvfp4"
    assert manifest["source"]["uri"] == f"hf://{LX_REPO}@{hub.commit}" and manifest["source"]["format"] == "lightx2v"
    assert sorted(manifest["source"]["experts"]["transformer"] + manifest["source"]["experts"]["transformer_2"]) == \
        sorted(T2V)
    assert manifest["base"]["uri"] == f"hf://{BASE_REPO}@{hub.commit}"
    assert not [f for f in manifest["base"]["files"] if f.endswith(".safetensors") and f.startswith("transformer")]
    assert manifest["quantization"]["summary"]["exact_layers"] == 60
    assert {p.name for p in model.iterdir()} >= {"transformer", "transformer_2", "text_encoder", "vae", "tokenizer",
                                                 "scheduler", "model_index.json"}
    # the pinned revisions are in the cache key: another base revision is another checkpoint
    other = load_spec(_spec(tmp_path / "other", hub, base_rev="f" * 40))
    assert model_layer.model_key(other) != model_layer.model_key(spec)


def test_an_fp8_spec_imports_an_fp8_source_and_refuses_an_nvfp4_one(hub, tiny_checkpoint, tmp_path, monkeypatch):
    """`quantization = "fp8"` with `format = "lightx2v"` bakes LightX2V's FP8 files as a gpubake fp8
    checkpoint; pointed at the NVFP4 pair it is refused before anything is written."""
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "cache"))
    fp8 = write_lightx2v_fp8(tiny_checkpoint, tmp_path / "fp8-written")
    for name in FP8_FILES["lightx2v"]:
        (fp8 / name).rename(hub.root / name)
    spec = load_spec(_spec(tmp_path / "fp8", hub, quantization="fp8", files=list(FP8_FILES["lightx2v"])))
    manifest = read_manifest(model_layer.cached_model(spec))
    assert (manifest["format"], manifest["source"]["format"], manifest["quantization"]["summary"]["exact_layers"]) == \
        ("fp8", "lightx2v", 60)
    wrong = load_spec(_spec(tmp_path / "nv", hub, quantization="fp8"))  # the NVFP4 pair under an FP8 spec
    with pytest.raises(GpubakeError, match=rf"hf://{LX_REPO}@{hub.commit}: holds an NVFP4 checkpoint, but fp8 "
                       "was asked for") as exc:
        model_layer.cached_model(wrong)
    assert "\n" not in str(exc.value) and ".partial" not in str(exc.value)
    assert model_layer.model_key(wrong) != model_layer.model_key(spec)


def test_a_placeholder_revision_builds_and_publishes_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "cache"))
    spec = load_spec(_spec(tmp_path, hub, source_rev="UNPINNED"))
    assert spec.model.unpinned == ["source"]
    with pytest.raises(SpecError, match=rf"model.source: hf://{LX_REPO}@UNPINNED is not pinned: replace UNPINNED") as exc:
        model_layer.prepare_model(spec, tmp_path / "context")
    assert "\n" not in str(exc.value) and not (tmp_path / "context").exists() and not (tmp_path / "cache").exists()
    from gpubake.images.marketplace.launch import publish

    with pytest.raises(SpecError, match="is not pinned"):
        publish(spec, "runpod", "registry.example/x@sha256:" + "a" * 64, dry_run=True, cfg={}, env={})


def test_bake_fetches_only_the_base_files_it_reads(hub, tmp_path):
    assert set(bake.BASE_FILES) >= {"text_encoder/*", "vae/*", "tokenizer/*", "transformer/config.json"}
    dest = tmp_path / "imported"
    res = bake.import_checkpoint(f"hf://{LX_REPO}@{hub.commit}", dest, "lightx2v", base=f"hf://{BASE_REPO}",
                                 files=T2V, model_id="tiny-wan2.2", progress=False)
    assert res["format"] == "lightx2v" and res["exact_layers"] == 60
    # without the selection the repo's four expert files are fetched and cannot be told apart
    with pytest.raises(GpubakeError, match="also stored in Wan2.2-I2V-A14B_NVFP4_Sparse_high.safetensors"):
        bake.import_checkpoint(f"hf://{LX_REPO}", tmp_path / "all", "lightx2v", base=f"hf://{BASE_REPO}",
                               progress=False)
    assert not (tmp_path / "all").exists()
