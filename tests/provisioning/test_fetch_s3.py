"""fetch s3:// and upload_dir against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from testutil import free_port
import requests

from gpubake.errors import FetchError
from gpubake.provisioning.fetch import fetch, staging_dir
from gpubake.provisioning.manifest import MANIFEST_NAME, build_manifest, verify_tree, write_manifest
from gpubake.provisioning.s3 import StorageError, upload_dir


def _tree(root: Path) -> Path:
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01\x02" * 300_000)
    (root / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    write_manifest(root, build_manifest(root, fmt="bf16"))
    return root


def test_upload_then_fetch_roundtrip(moto_s3, tmp_path):
    src = _tree(tmp_path / "src")
    uri = f"s3://{moto_s3.bucket}/models/tiny"
    up = upload_dir(src, uri, endpoint_url=moto_s3.endpoint)
    assert up["files"] == 3 and up["keys"][-1] == f"models/tiny/{MANIFEST_NAME}"  # manifest last
    dest = tmp_path / "dest"
    res = fetch(uri, dest, endpoint_url=moto_s3.endpoint, progress=False)
    assert res["verified"] == "manifest" and res["files"] == 2
    verify_tree(dest)
    assert (dest / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == b"\x01\x02" * 300_000


def test_upload_dry_run_touches_nothing(moto_s3, tmp_path):
    src = _tree(tmp_path / "src")
    res = upload_dir(src, f"s3://{moto_s3.bucket}/x", endpoint_url=moto_s3.endpoint, dry_run=True)
    assert res["files"] == 3
    assert moto_s3.client.list_objects_v2(Bucket=moto_s3.bucket).get("KeyCount", 0) == 0


def test_prefix_without_manifest_is_hashed_and_recorded(moto_s3, tmp_path):
    moto_s3.client.put_object(Bucket=moto_s3.bucket, Key="raw/a.bin", Body=b"abc")
    moto_s3.client.put_object(Bucket=moto_s3.bucket, Key="raw/sub/b.bin", Body=b"defg")
    dest = tmp_path / "dest"
    res = fetch(f"s3://{moto_s3.bucket}/raw/", dest, endpoint_url=moto_s3.endpoint, progress=False)
    assert res["verified"] == "none"
    verify_tree(dest)  # the manifest fetch wrote records what arrived
    assert (dest / "sub" / "b.bin").read_bytes() == b"defg"


def test_corrupted_object_is_refused(moto_s3, tmp_path):
    src = _tree(tmp_path / "src")
    uri = f"s3://{moto_s3.bucket}/m"
    upload_dir(src, uri, endpoint_url=moto_s3.endpoint)
    moto_s3.client.put_object(Bucket=moto_s3.bucket, Key="m/model_index.json", Body=b'{"_class_name": "Evil"}')
    with pytest.raises(FetchError, match="model_index.json: size") as exc:
        fetch(uri, tmp_path / "dest", endpoint_url=moto_s3.endpoint, progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "dest").exists()


def test_wrong_credentials(moto_s3, tmp_path, monkeypatch):
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_s3.endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    iam.put_user_policy(UserName="reader", PolicyName="all", PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}')
    src = _tree(tmp_path / "src")
    uri = f"s3://{moto_s3.bucket}/m"
    upload_dir(src, uri, endpoint_url=moto_s3.endpoint)
    requests.post(f"{moto_s3.endpoint}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + key["SecretAccessKey"])
    with pytest.raises(FetchError, match="refused the credentials") as exc:
        fetch(uri, tmp_path / "dest", endpoint_url=moto_s3.endpoint, progress=False)
    assert key["SecretAccessKey"] not in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "dest").exists()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])  # the right one works
    fetch(uri, tmp_path / "dest", endpoint_url=moto_s3.endpoint, progress=False)
    verify_tree(tmp_path / "dest")


def test_missing_bucket_and_empty_prefix(moto_s3, tmp_path):
    with pytest.raises(FetchError, match="not found"):
        fetch("s3://no-such-bucket-xyz/m", tmp_path / "a", endpoint_url=moto_s3.endpoint, progress=False)
    with pytest.raises(FetchError, match="no objects"):
        fetch(f"s3://{moto_s3.bucket}/empty/", tmp_path / "b", endpoint_url=moto_s3.endpoint, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unreachable_endpoint(tmp_path, monkeypatch):

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    port = free_port()  # nothing listens there
    with pytest.raises(FetchError, match="unreachable") as exc:
        fetch("s3://b/p", tmp_path / "d", endpoint_url=f"http://127.0.0.1:{port}", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "d").exists() and not staging_dir(tmp_path / "d").exists()


def test_upload_dir_errors(moto_s3, tmp_path):
    with pytest.raises(StorageError, match="not a directory"):
        upload_dir(tmp_path / "nope", f"s3://{moto_s3.bucket}/x")
    with pytest.raises(StorageError, match="no bucket"):
        upload_dir(tmp_path, "s3:///x")
    src = _tree(tmp_path / "src")
    with pytest.raises(StorageError, match="not found|NoSuchBucket") as exc:
        upload_dir(src, "s3://missing-bucket-q/x", endpoint_url=moto_s3.endpoint)
    assert "\n" not in str(exc.value)
