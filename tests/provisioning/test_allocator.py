"""provisioning.allocator: expandable segments for the self-test and the service, the
user's own PYTORCH_CUDA_ALLOC_CONF kept."""

from __future__ import annotations

from gpubake.provisioning.allocator import ALLOC_CONF, DEFAULT, use_expandable_segments


def test_expandable_segments_unless_the_user_chose():
    env: dict[str, str] = {}
    assert use_expandable_segments(env) == DEFAULT == "expandable_segments:True" and env[ALLOC_CONF] == DEFAULT
    env = {ALLOC_CONF: ""}  # empty: unset
    assert use_expandable_segments(env) == DEFAULT
    env = {ALLOC_CONF: "expandable_segments:False,max_split_size_mb:512"}
    assert use_expandable_segments(env) == "expandable_segments:False,max_split_size_mb:512"


def test_the_service_sets_it_before_its_workers_load(monkeypatch, tmp_path):
    """build_service sets it first thing, with or without a self-test (it fails later here:
    no image facts), so no worker's first CUDA allocation comes before it."""
    import pytest

    from gpubake.provisioning.serving.build import build_service

    monkeypatch.delenv(ALLOC_CONF, raising=False)
    monkeypatch.delenv("GPUBAKE_IMAGE", raising=False)
    monkeypatch.setenv("GPUBAKE_FACTS", str(tmp_path / "absent.json"))
    with pytest.raises(Exception):
        build_service(selftest=False, model_dir=tmp_path)
    import os

    assert os.environ[ALLOC_CONF] == DEFAULT
