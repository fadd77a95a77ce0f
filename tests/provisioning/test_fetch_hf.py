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
