"""Fixtures shared by every part's tests.

`moto_s3` is moto's S3 server on 127.0.0.1 with one bucket and the AWS_* environment
pointing at it (fetch s3:// and push-weights share it, as they share `provisioning.s3`).

`tiny_checkpoint` and `tiny_nvfp4_checkpoint` are built ONCE per session (a few
seconds) into a temporary directory; tests must treat them as read-only (copy with
`shutil.copytree` before changing anything).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from testutil import free_port


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Wan 2.2 (two experts) BF16 checkpoint in the diffusers layout."""
    from gpubake.provisioning.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", seed=0)


@pytest.fixture(scope="session")
def tiny_nvfp4_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` quantized to NVFP4 with the default policy (has gpubake-manifest.json)."""
    from gpubake.provisioning.quantize import quantize_checkpoint

    dest = tmp_path_factory.mktemp("ckpt") / "tiny-nvfp4"
    quantize_checkpoint(tiny_checkpoint, dest, policy="default", progress=False)
    return dest


@pytest.fixture(scope="session")
def tiny_fp8_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` quantized to FP8 weights (`--format fp8`) with the default policy."""
    from gpubake.provisioning.quantize import quantize_checkpoint

    dest = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    quantize_checkpoint(tiny_checkpoint, dest, policy="default", progress=False, fmt="fp8")
    return dest


@dataclass
class S3:
    endpoint: str
    bucket: str
    client: Any


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch):
    """moto's real S3 server over HTTP on loopback, with a fresh bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-print")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = "weights-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=bucket)
    try:
        yield S3(endpoint, bucket, client)
    finally:
        import requests

        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=5)
        server.stop()
