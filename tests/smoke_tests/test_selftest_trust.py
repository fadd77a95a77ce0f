"""Issue 13, weights: the self-test's model check holds the manifest to be the whole
truth. Files it does not list, symlinks out of the model directory and anything but a
regular file fail the check (the demo image on the CPU, as `gpubake selftest --image
demo --device cpu --model-dir DIR` runs it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

W = "diffusion_pytorch_model.safetensors"
INDEX = f"transformer/{W}.index.json"
ZEROS = "transformer/diffusion_pytorch_model-00001-of-00001.safetensors"


@pytest.fixture
def baked(tiny_nvfp4_checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_nvfp4_checkpoint, out)
    return out


def test_injected_index_and_zero_shard_fail_the_model_check(run_selftest, demo_spec, no_gpu, baked):
    real = load_file(str(baked / "transformer" / W))
    save_file({k: torch.zeros_like(v) for k, v in real.items()}, str(baked / ZEROS), metadata={"format": "pt"})
    (baked / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: Path(ZEROS).name for k in real}}))
    report = run_selftest(demo_spec, no_gpu, model_dir=baked)
    assert report.verdict == "fail"
    model = report.stage("model")
    assert model.status == "fail" and model.message == f"{ZEROS}: not in the manifest (+1 more)"
    assert model.values["extra_files"] == [ZEROS, INDEX]
    assert f"{INDEX}: not in the manifest" in model.values["problems"]
    assert report.stage("render").status == "skip"  # the injected weights are never served


def test_symlink_out_of_the_model_dir_fails(run_selftest, demo_spec, no_gpu, baked):
    (baked / "vae" / "config.json").unlink()
    (baked / "vae" / "config.json").symlink_to("/etc/passwd")
    report = run_selftest(demo_spec, no_gpu, model_dir=baked)
    model = report.stage("model")
    assert model.status == "fail" and model.message.startswith("vae/config.json: symlink to /etc/passwd leads outside")
    assert model.values["hashed_files"] == model.values["files"] - 1  # the link was never read


def test_nested_manifest_name_is_not_allowed(run_selftest, demo_spec, no_gpu, baked):
    """Only the top-level manifest is allow-listed; the same name deeper is content."""
    (baked / "vae" / "gpubake-manifest.json").write_text("{}")
    report = run_selftest(demo_spec, no_gpu, model_dir=baked)
    assert report.stage("model").message == "vae/gpubake-manifest.json: not in the manifest"


@pytest.mark.timeout(120)
def test_listed_file_replaced_by_a_fifo_fails_without_hanging(run_selftest, demo_spec, no_gpu, baked):
    cfg = baked / "scheduler" / "scheduler_config.json"
    cfg.unlink()
    os.mkfifo(cfg)  # opening it to hash would block forever
    report = run_selftest(demo_spec, no_gpu, model_dir=baked)
    assert report.stage("model").message == "scheduler/scheduler_config.json: not a regular file"


def test_clean_copy_passes(run_selftest, demo_spec, no_gpu, baked):
    """The control: the same copy, untouched, passes (so the failures above are the attacks')."""
    report = run_selftest(demo_spec, no_gpu, model_dir=baked)
    assert report.verdict == "pass", report.summary()
    assert report.stage("model").values["extra_files"] == [] and report.stage("model").values["problems"] == []
