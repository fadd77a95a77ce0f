"""The weights as several layers (images/layers.py): grouping, the A14B plan, staging, estimates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpubake.errors import BuildError
from gpubake.images import catalog, layers, model_layer, render
from gpubake.images.layers import LAYER_LIMIT, META

GB = 1_000_000_000


def _sizes(**components: list[int]) -> dict[str, int]:
    out = {"model_index.json": 500, "tokenizer/tokenizer.json": 16_000_000, "transformer/config.json": 800}
    for name, shards in components.items():
        for i, size in enumerate(shards, 1):
            out[f"{name}/diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"] = size
    return out


def test_shards_group_into_layers_under_the_limit_in_order():
    sizes = _sizes(text_encoder=[int(2.3 * GB)] * 5, vae=[int(0.5 * GB)], transformer=[int(0.7 * GB)] * 12,
                   transformer_2=[int(0.7 * GB)] * 12)
    plan = layers.plan_files(sizes)
    assert [layer.component for layer in plan] == ["text_encoder"] * 5 + ["vae"] + ["transformer"] * 3 + ["transformer_2"] * 3 + [META]
    assert all(layer.bytes <= LAYER_LIMIT for layer in plan)
    assert [layer.name for layer in plan][:6] == ["00-text_encoder-1", "01-text_encoder-2", "02-text_encoder-3",
                                                 "03-text_encoder-4", "04-text_encoder-5", "05-vae"]
    assert plan[-1].name == "12-meta" and set(plan[-1].files) == {"model_index.json", "tokenizer/tokenizer.json", "transformer/config.json"}
    expert = [layer for layer in plan if layer.component == "transformer"]
    assert [len(layer.files) for layer in expert] == [4, 4, 4]  # balanced: 2.8 GB each, not 3.5 + 3.5 + 1.4
    files = [f for layer in expert for f in layer.files]
    assert files == sorted(files)  # contiguous, in name order
    every = sorted(f for layer in plan for f in layer.files)
    assert every == sorted(sizes)  # each file in exactly one layer


def test_a_file_over_the_limit_is_a_layer_of_its_own_and_flagged():
    plan = layers.plan_files(_sizes(vae=[5 * GB], transformer=[int(3.9 * GB), int(0.2 * GB)]))
    vae = next(layer for layer in plan if layer.component == "vae")
    assert vae.to_json()["over_limit"] is True
    assert [layer.bytes for layer in plan if layer.component == "transformer"] == [int(3.9 * GB), int(0.2 * GB)]


def test_folder_names_from_a_checkpoint_must_be_plain():
    with pytest.raises(BuildError, match=r"^weights: a b/x.safetensors: folder name 'a b' is not a plain name"):
        layers.plan_files({"a b/x.safetensors": 10})


@pytest.mark.parametrize("image", ["wan22-t2v-a14b-nvfp4", "wan22-t2v-a14b-nvfp4-hopper"])
def test_the_a14b_plan_lists_layers_of_at_most_4_gb(image):
    estimate = layers.estimate(catalog.find(image), gpu=False, cores=2)
    out = estimate.to_json()
    names = [layer["name"] for layer in out["layers"]]
    assert all(0 < layer["bytes"] <= 4 * GB for layer in out["layers"]) and len(names) == len(set(names))
    comps = [layer["component"] for layer in out["layers"]]
    assert comps.index("vae") < comps.index("transformer") < comps.index("transformer_2") < comps.index(META) == len(comps) - 1
    assert "text_encoder" in comps and comps.index("text_encoder") < comps.index("vae")
    assert 26 * GB < out["image_weight_bytes"] < 31 * GB  # ~27 GiB: two 8.4 GB experts, an 11.4 GB encoder, the VAE
    assert 120 * GB < out["download_bytes"] < 130 * GB  # the fp32 experts of the diffusers repo
    assert out["quantize"]["device"] == "cpu" and out["quantize"]["cpu_cores"] == 2
    assert out["seconds"]["quantize"] == pytest.approx(2 * 14_050_918_400 / 4_800_000, rel=0.01)
    assert out["disk_bytes"]["total"] > out["download_bytes"] and out["ram_bytes"] > 4 * GB
    on_gpu = layers.estimate(catalog.find(image), gpu=True).to_json()
    assert on_gpu["quantize"]["device"] == "cuda" and on_gpu["seconds"]["quantize"] < 60
    assert all(layer["source"].startswith("hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers@5be7df96") for layer in out["layers"])


def test_estimates_at_boot_and_of_unknown_models():
    spec = catalog.find("wan22-ti2v-5b")
    boot = spec.model_copy(update={"model": spec.model.model_copy(update={"at": "boot"})})
    assert layers.estimate(boot).to_json()["layers"] == [] and layers.estimate(boot).download_bytes == 0
    other = spec.model_copy(update={"model": spec.model.model_copy(update={"id": "someone-elses-model"})})
    unknown = layers.estimate(other)
    assert [layer.name for layer in unknown.layers] == ["00-weights"] and unknown.download_bytes is None
    assert "no size table for model 'someone-elses-model'" in unknown.notes[0]


def test_the_tiny_estimate_matches_the_tiny_checkpoint(tiny_nvfp4_checkpoint):
    """The size table's tiny entry is what make_tiny + quantize really give: the same layers."""
    estimated = layers.estimated_layers(catalog.find("demo"))
    exact = layers.plan_checkpoint(Path(tiny_nvfp4_checkpoint))
    assert [(layer.name, layer.component) for layer in estimated] == [(layer.name, layer.component) for layer in exact]
    for e, x in zip(estimated[:-1], exact[:-1]):  # the weight files (meta holds the configs and the manifest)
        assert e.bytes == pytest.approx(x.bytes, rel=0.05), e.name


def test_assign_fits_a_checkpoint_into_the_plan_it_was_rendered_with():
    planned = layers.plan_files(_sizes(transformer=[GB] * 9), estimated=True)
    assert [layer.name for layer in planned] == ["00-transformer-1", "01-transformer-2", "02-transformer-3", "03-meta"]
    real = _sizes(transformer=[int(0.5 * GB)] * 7)  # smaller and fewer shards than estimated
    staged = layers.assign(planned, real)
    assert [layer.name for layer in staged] == [layer.name for layer in planned]
    assert sorted(f for layer in staged for f in layer.files) == sorted(real)
    assert max(layer.bytes for layer in staged[:3]) == int(1.5 * GB)  # 7 shards in 3 layers: the largest as small as it can be
    with pytest.raises(BuildError, match=r"^weights: the checkpoint has vae, which the context's layer plan lacks"):
        layers.assign(planned, _sizes(transformer=[GB], vae=[GB]))
    with pytest.raises(BuildError, match=r"^weights: layer 00-transformer would hold 10.0 GB \(> 4 GB\)"):
        layers.assign(layers.plan_files(_sizes(transformer=[GB]), estimated=True), _sizes(transformer=[GB] * 10))


def test_stage_hard_links_each_layer_into_its_folder(tmp_path: Path, tiny_nvfp4_checkpoint):
    ckpt = Path(tiny_nvfp4_checkpoint)
    plan = layers.plan_checkpoint(ckpt)
    layers.stage(ckpt, plan, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [layer.name for layer in plan]
    for layer in plan:
        for rel in layer.files:
            staged = tmp_path / "model" / layer.name / rel
            assert staged.read_bytes() == (ckpt / rel).read_bytes()
            assert os.stat(staged).st_ino == os.stat(ckpt / rel).st_ino  # a link, not a copy
    merged = {p.relative_to(tmp_path / "model" / p.relative_to(tmp_path / "model").parts[0]).as_posix()
              for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert merged == {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}  # the COPYs rebuild the tree


def test_prepare_model_stages_the_context_plan(tmp_path: Path, monkeypatch, tiny_nvfp4_checkpoint):
    """A context rendered before the weights existed (the estimate) takes the real checkpoint."""
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "cache"))
    spec = catalog.find("demo")
    ctx = tmp_path / "ctx"
    render.render_context(spec, "runpod", ctx, render.RenderOptions(timestamp=1_700_000_000))
    assert all(layer["estimated"] for layer in json.loads((ctx / "weights.json").read_text())["layers"])
    cached = model_layer.cached_path(spec)
    cached.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_nvfp4_checkpoint, cached)  # as if made before
    model_layer.prepare_model(spec, ctx)
    planned = [layer["name"] for layer in json.loads((ctx / "weights.json").read_text())["layers"]]
    assert sorted(p.name for p in (ctx / "model").iterdir()) == planned
    assert (ctx / "model" / planned[-1] / "gpubake-manifest.json").is_file()
    with pytest.raises(BuildError, match="already exists; render a fresh context"):
        model_layer.prepare_model(spec, ctx)


def test_the_cache_key_covers_the_quantizer_code_for_every_source(monkeypatch):
    spec = catalog.find("wan22-t2v-a14b-nvfp4-hopper")
    key = model_layer.model_key(spec)
    monkeypatch.setattr(model_layer.bake, "code_identity", lambda: "a quantizer fix")
    assert model_layer.model_key(spec) != key  # an hf:// source too: no stale NVFP4 bytes after a fix
    monkeypatch.undo()
    policy = spec.model_copy(update={"model": spec.model.model_copy(update={"policy": "ffn-only"})})
    assert model_layer.model_key(policy) != key
    boot = spec.model_copy(update={"model": spec.model.model_copy(update={"at": "boot"})})
    assert model_layer.model_key(boot) == key  # where the weights go is not what they are
