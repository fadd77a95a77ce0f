"""`serve --no-selftest` checks the model before it accepts a job: sizes on every start,
full hashes once per file version (remembered by size and mtime in the data dir)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gpubake.provisioning.serving.modelverify import CACHE_NAME, verify_model_dir

EXPERT = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model_copy(tiny_nvfp4_checkpoint: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_nvfp4_checkpoint, dest)
    assert (dest / EXPERT).is_file()
    return dest


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_model_is_not_served(make_service, serve_service, model_copy, tmp_path):
    _flip_byte(model_copy / EXPERT)  # same size: only a hash finds it
    service = make_service(selftest=False, device="cpu", model_dir=model_copy, data_dir=tmp_path / "data")
    with serve_service(service) as s:
        body = s.wait_phase("failed")
        assert body["reason"].startswith(f"model check failed: {EXPERT}: sha256 mismatch")
        assert s.get("/health").status_code == 503
        assert body["model_check"]["problems"][0].startswith(f"{EXPERT}: sha256 mismatch")
        r = s.post("/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503
        assert r.json()["error"].startswith(f"generation disabled on this machine: model check failed: {EXPERT}")
    assert service.generator is None  # the corrupt weights were never loaded


def test_truncated_and_missing_files(model_copy, tmp_path):
    expert = model_copy / EXPERT
    expert.write_bytes(expert.read_bytes()[:-1])
    (model_copy / "model_index.json").unlink()
    check = verify_model_dir(model_copy, tmp_path / CACHE_NAME)
    assert f"model_index.json: missing from {model_copy}" in check.problems
    size = expert.stat().st_size
    assert f"{EXPERT}: size {size} != manifest size {size + 1}" in check.problems
    assert EXPERT not in json.loads((tmp_path / CACHE_NAME).read_text())["files"]


def test_hashes_once_then_by_size_and_mtime(model_copy, tmp_path):
    cache = tmp_path / CACHE_NAME
    first = verify_model_dir(model_copy, cache)
    assert first.problems == [] and first.files > 5 and first.hashed_files == first.files and first.cached_files == 0
    again = verify_model_dir(model_copy, cache)
    assert again.problems == [] and again.hashed_files == 0 and again.cached_files == first.files
    # a file written again (new mtime) is hashed again, and a changed one is caught
    _flip_byte(model_copy / EXPERT)
    third = verify_model_dir(model_copy, cache)
    assert third.hashed_files == 1 and third.problems[0].startswith(f"{EXPERT}: sha256 mismatch")
    # restored bytes: good again, and remembered
    _flip_byte(model_copy / EXPERT)
    assert verify_model_dir(model_copy, cache).problems == []
    assert verify_model_dir(model_copy, cache).hashed_files == 0
    # another manifest (e.g. a re-quantized model in place) forgets every remembered hash
    manifest = model_copy / "gpubake-manifest.json"
    data = json.loads(manifest.read_text())
    data["note"] = "rebuilt"
    manifest.write_text(json.dumps(data))
    assert verify_model_dir(model_copy, cache).hashed_files == first.files


def test_restart_verifies_from_the_cache(make_service, model_copy, tmp_path):
    data = tmp_path / "data"
    for expected_hashed in (None, 0):
        service = make_service(selftest=False, device="cpu", model_dir=model_copy, data_dir=data)
        service.start()
        try:
            assert service.wait_settled(120) and service.phase == "ready", service.reason
        finally:
            service.stop()
        check = service.model_check
        assert check["problems"] == []
        if expected_hashed is None:
            assert check["hashed_files"] == check["files"]
        else:
            assert check["hashed_files"] == expected_hashed and check["cached_files"] == check["files"]
    os.utime(model_copy / EXPERT)  # touched: hashed again on the next start
    assert verify_model_dir(model_copy, data / CACHE_NAME).hashed_files == 1
