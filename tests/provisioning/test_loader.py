"""load_pipeline: BF16 and NVFP4 checkpoints into a diffusers WanPipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.loader import checkpoint_format, load_expert, load_pipeline

W = "diffusion_pytorch_model.safetensors"
KW = dict(negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=4.0,
          guidance_scale_2=3.0, output_type="np", max_sequence_length=16)


def _frames(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cat", generator=torch.Generator().manual_seed(seed), **KW).frames[0]


def test_bf16_loader_matches_diffusers_from_pretrained(tiny_checkpoint):
    from diffusers import WanPipeline

    ours = _frames(load_pipeline(tiny_checkpoint))
    theirs = _frames(WanPipeline.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16))
    assert np.array_equal(ours, theirs)


def test_nvfp4_pipeline_has_both_experts_and_generates_on_cpu(tiny_checkpoint, tiny_nvfp4_checkpoint):
    assert checkpoint_format(tiny_nvfp4_checkpoint) == "nvfp4" and checkpoint_format(tiny_checkpoint) == "bf16"
    pipe = load_pipeline(tiny_nvfp4_checkpoint)
    assert pipe.config.boundary_ratio == 0.875
    for tr in (pipe.transformer, pipe.transformer_2):
        blk = tr.blocks[1]
        for lin in (blk.attn1.to_q, blk.attn2.to_out[0], blk.ffn.net[2]):
            assert isinstance(lin, NVFP4Linear) and lin.weight_packed.device.type == "cpu"
            assert not hasattr(lin, "weight")  # no BF16 copy of a quantized weight
        assert isinstance(tr.proj_out, torch.nn.Linear) and tr.proj_out.weight.dtype == torch.bfloat16
        assert not any(p.is_meta for p in tr.parameters()) and not any(b.is_meta for b in tr.buffers())
    frames = _frames(pipe)
    ref = _frames(load_pipeline(tiny_checkpoint))
    assert frames.shape == (5, 64, 64, 3) and np.isfinite(frames).all()
    mse = float(((frames - ref) ** 2).mean())
    assert 0 < mse and 10 * np.log10(1 / mse) > 30  # close to BF16, yet not identical


def test_the_two_experts_are_used(tiny_nvfp4_checkpoint):
    """boundary_ratio splits the steps: each expert runs at least once."""
    pipe = load_pipeline(tiny_nvfp4_checkpoint)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    _frames(pipe)
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0


def _edited(tiny_nvfp4_checkpoint, tmp_path, edit):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_nvfp4_checkpoint, ck)
    sd = load_file(str(ck / "transformer_2" / W))
    edit(sd)
    save_file(sd, str(ck / "transformer_2" / W))
    return ck


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda sd: sd.pop("blocks.2.ffn.net.2.weight_scale"), "missing tensor 'blocks.2.ffn.net.2.weight_scale'"),
        (lambda sd: sd.__setitem__("blocks.0.bogus", torch.zeros(1)), "unexpected tensor 'blocks.0.bogus'"),
        (lambda sd: sd.__setitem__("blocks.0.attn1.to_q.weight_packed", torch.zeros(64, 16, dtype=torch.uint8)),
         r"'blocks.0.attn1.to_q.weight_packed' has shape \[64, 16\], expected \[64, 32\]"),
    ],
)
def test_bad_tensors_name_the_key(tiny_nvfp4_checkpoint, tmp_path, edit, pattern):
    ck = _edited(tiny_nvfp4_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError, match=pattern) as exc:
        load_pipeline(ck)
    assert "\n" not in str(exc.value) and "transformer_2" in str(exc.value)


def test_verify_catches_a_changed_file(tiny_nvfp4_checkpoint, tmp_path):
    from gpubake.provisioning.manifest import ManifestError

    ck = tmp_path / "ck"
    shutil.copytree(tiny_nvfp4_checkpoint, ck)
    (ck / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(ManifestError, match="scheduler/scheduler_config.json"):
        load_pipeline(ck, verify=True)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="model_index.json: missing"):
        load_pipeline(tmp_path)
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_expert(_config_only(tmp_path))


def _config_only(tmp_path):
    from gpubake.provisioning.tiny import TRANSFORMER_CONFIG
    import json

    d = tmp_path / "t"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TRANSFORMER_CONFIG}))
    return d


@pytest.mark.parametrize("threads", [2, 5])
def test_threaded_read_loads_the_same_tensors(tiny_nvfp4_checkpoint, tmp_path, monkeypatch, threads):
    """GPUBAKE_LOAD_THREADS: the keys read by several `safe_open` handles at once, over a
    sharded expert, give the one-thread loader's tensors bit for bit, and so its model."""
    from gpubake.provisioning import loader

    expert = tmp_path / "transformer"
    shutil.copytree(tiny_nvfp4_checkpoint / "transformer", expert)
    whole = load_file(str(expert / W))
    keys = sorted(whole)
    (expert / W).unlink()  # two shards, as diffusers writes large experts
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: whole[k] for k in part}, str(expert / name), metadata={"format": "pt"})
    import json

    (expert / f"{W.rsplit('.', 1)[0]}.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: names[i] for i, part in enumerate(halves) for k in part}}))
    shards = [expert / n for n in names]
    one = dict(loader._read_tensors(shards, "cpu", 1))
    many = loader._read_tensors(shards, "cpu", threads)
    assert sorted(k for k, _ in many) == keys  # every key once
    assert all(torch.equal(t, one[k]) and t.dtype == one[k].dtype for k, t in many)
    monkeypatch.setenv("GPUBAKE_LOAD_THREADS", str(threads))
    threaded = load_expert(expert).state_dict()
    monkeypatch.setenv("GPUBAKE_LOAD_THREADS", "1")
    single = load_expert(expert).state_dict()
    assert threaded.keys() == single.keys() and all(torch.equal(threaded[k], single[k]) for k in single)


def test_load_threads_must_be_a_count(monkeypatch, tiny_nvfp4_checkpoint):
    from gpubake.errors import GpubakeError

    monkeypatch.setenv("GPUBAKE_LOAD_THREADS", "0")
    with pytest.raises(GpubakeError, match="GPUBAKE_LOAD_THREADS"):
        load_expert(tiny_nvfp4_checkpoint / "transformer")


def test_direct_placement_loads_the_same_pipeline(tiny_nvfp4_checkpoint, monkeypatch):
    """GPUBAKE_LOAD_DIRECT=on: diffusers places the encoder and the VAE itself (device_map);
    the frames are the host-then-move loader's, bit for bit (on the CPU, device_map="cpu")."""
    from gpubake.provisioning.loader import direct_device_map, load_phases

    monkeypatch.setenv("GPUBAKE_LOAD_DIRECT", "off")
    moved = load_pipeline(tiny_nvfp4_checkpoint)
    monkeypatch.setenv("GPUBAKE_LOAD_DIRECT", "on")
    placed = load_pipeline(tiny_nvfp4_checkpoint)
    assert getattr(placed, "hf_device_map", None) == "cpu" and getattr(moved, "hf_device_map", None) is None
    assert np.array_equal(_frames(placed), _frames(moved))
    assert set(load_phases(placed)) == set(load_phases(moved))
    # where diffusers cannot place it, the loader moves it as before
    assert [direct_device_map(d) for d in ("cpu", "cuda", "cuda:0", "cuda:1")] == ["cpu", "cuda", "cuda", None]
    assert direct_device_map("cuda", host_components=("text_encoder",)) is None
    monkeypatch.setenv("GPUBAKE_LOAD_DIRECT", "off")
    assert direct_device_map("cuda") is None


def test_overlapped_load_gives_the_same_pipeline(tiny_nvfp4_checkpoint, monkeypatch):
    """GPUBAKE_LOAD_OVERLAP=on: the experts load in a thread while diffusers loads the rest;
    the pipeline (both experts registered, every tensor) and its frames are the sequential
    loader's, and the phases say how long the main thread waited for the experts."""
    from gpubake.provisioning.loader import load_phases

    monkeypatch.setenv("GPUBAKE_LOAD_OVERLAP", "off")
    one_by_one = load_pipeline(tiny_nvfp4_checkpoint)
    monkeypatch.setenv("GPUBAKE_LOAD_OVERLAP", "on")
    overlapped = load_pipeline(tiny_nvfp4_checkpoint)
    for name in ("transformer", "transformer_2"):
        a, b = getattr(one_by_one, name).state_dict(), getattr(overlapped, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert overlapped.config[name] == one_by_one.config[name] == ("diffusers", "WanTransformer3DModel")
    assert np.array_equal(_frames(overlapped), _frames(one_by_one))
    # the main thread builds and assigns the experts; only the reads overlap diffusers' load
    assert set(load_phases(overlapped)) == set(load_phases(one_by_one)) | {"experts_build", "experts_wait",
                                                                          "experts_assign"}


def test_overlapped_load_raises_the_readers_error_and_leaves_no_thread(tiny_nvfp4_checkpoint, tmp_path, monkeypatch):
    """A shard that fails in the reading thread (truncated: its header is whole, so the
    checks before the read pass) fails the load as the sequential loader fails it."""
    import threading

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_nvfp4_checkpoint, broken)
    path = broken / "transformer_2" / W
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    errors = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("GPUBAKE_LOAD_OVERLAP", mode)
        with pytest.raises(Exception) as got:
            load_pipeline(broken)
        errors[mode] = (type(got.value), str(got.value))
    assert errors["on"] == errors["off"]
    assert not [t for t in threading.enumerate() if t.name.startswith("gpubake-experts")]
