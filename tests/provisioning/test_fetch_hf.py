"""hf:// sources: URI parsing and failures (the real Hub is not reachable from CI)."""

from __future__ import annotations

import socket

import pytest

from gpubake.errors import FetchError
from gpubake.provisioning.fetch import fetch, staging_dir
from gpubake.provisioning.hf_fetch import parse_hf_uri


def test_parse():
    assert parse_hf_uri("hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers").repo_id == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    ref = parse_hf_uri("hf://org/repo@abc123")
    assert (ref.repo_id, ref.revision, str(ref)) == ("org/repo", "abc123", "hf://org/repo@abc123")
    for bad in ("hf://repo", "hf://a/b/c", "hf:///x"):
        with pytest.raises(FetchError, match="expected hf://org/repo"):
            parse_hf_uri(bad)


def test_unreachable_endpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    dest = tmp_path / "ckpt"
    with pytest.raises(FetchError, match="unreachable") as exc:
        fetch("hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers", dest, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "hf_secret_token_value" not in msg
    assert not dest.exists()
    assert not staging_dir(dest).exists()


def test_dry_run(tmp_path):
    res = fetch("hf://Wan-AI/Wan2.2-TI2V-5B-Diffusers@main", tmp_path / "x", dry_run=True, progress=False)
    assert res == {"source": "hf://Wan-AI/Wan2.2-TI2V-5B-Diffusers@main", "dest": str(tmp_path / "x"), "dry_run": True}


def _publish_repo(root):
    (root / "transformer").mkdir()
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (root / "transformer" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    (root / "model_index.json").write_text('{"_class_name": "WanPipeline"}')


def test_fetch_from_a_local_hub_verifies_lfs_and_keeps_the_token_out(fake_hub, tmp_path, monkeypatch):
    _publish_repo(fake_hub.root)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    dest = tmp_path / "ckpt"
    res = fetch(f"hf://{fake_hub.repo}", dest, progress=False)
    assert res["verified"] == "hub" and res["files"] == 3
    for p in fake_hub.root.rglob("*"):
        if p.is_file():
            assert (dest / p.relative_to(fake_hub.root)).read_bytes() == p.read_bytes()
    assert "Bearer hf_secret_token_value" in fake_hub.auth  # the token was used...
    for p in dest.rglob("*"):  # ...and written nowhere
        assert p.is_dir() or b"hf_secret_token_value" not in p.read_bytes()
    assert not (dest / ".cache").exists() and not staging_dir(dest).exists()


def test_hub_sha256_mismatch_is_refused(fake_hub, tmp_path):
    _publish_repo(fake_hub.root)
    fake_hub.lfs_sha["transformer/diffusion_pytorch_model.safetensors"] = "ab" * 32  # the Hub says otherwise
    dest = tmp_path / "ckpt"
    with pytest.raises(FetchError, match="diffusion_pytorch_model.safetensors: sha256 mismatch") as exc:
        fetch(f"hf://{fake_hub.repo}", dest, progress=False)
    assert "\n" not in str(exc.value)
    assert not dest.exists()


def test_unknown_repo(fake_hub, tmp_path):
    with pytest.raises(FetchError, match="not found") as exc:
        fetch("hf://Wan-AI/No-Such-Repo", tmp_path / "x", progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "x").exists()


def test_bytes_flipped_in_transit_are_refused(fake_hub, tmp_path):
    _publish_repo(fake_hub.root)
    fake_hub.flip.add("transformer/diffusion_pytorch_model.safetensors")
    dest = tmp_path / "ckpt"
    with pytest.raises(FetchError, match="sha256 mismatch") as exc:
        fetch(f"hf://{fake_hub.repo}", dest, progress=False)
    assert "\n" not in str(exc.value)
    assert not dest.exists()


def test_small_git_file_checked_against_its_blob_id(fake_hub, tmp_path):
    _publish_repo(fake_hub.root)
    fake_hub.flip.add("model_index.json")
    with pytest.raises(FetchError, match="model_index.json: git blob sha1 mismatch"):
        fetch(f"hf://{fake_hub.repo}", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()
