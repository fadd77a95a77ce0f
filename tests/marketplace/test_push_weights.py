"""`gpubake push-weights` against moto's S3 server on loopback (boto3, the S3 API).

push-weights is a thin command over `gpubake.provisioning.s3.upload_dir`, the one S3
implementation that `fetch s3://` also uses; the round trip below pushes a checkpoint and
fetches it back through `gpubake.provisioning.fetch`.
"""

from __future__ import annotations

import json
from pathlib import Path





def checkpoint(root: Path) -> Path:
    """A small checkpoint directory with the gpubake manifest fetch verifies."""
    import hashlib

    files = {"transformer/model.safetensors": b"\x01" * 70_000, "config.json": b'{"a": 1}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = {"files": {rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()}}
    (root / "gpubake-manifest.json").write_text(json.dumps(manifest))
    return root


def test_push_weights_uploads_and_fetch_reads_it_back(moto_s3, cli, tmp_path):
    endpoint, bucket, client = moto_s3.endpoint, moto_s3.bucket, moto_s3.client
    src = checkpoint(tmp_path / "ckpt")
    code, out, err = cli("push-weights", src, f"s3://{bucket}/wan/tiny", "--endpoint-url", endpoint, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["files"] == 3 and result["uri"] == f"s3://{bucket}/wan/tiny/"
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["wan/tiny/config.json", "wan/tiny/gpubake-manifest.json", "wan/tiny/transformer/model.safetensors"]
    assert result["keys"][-1] == "wan/tiny/gpubake-manifest.json"  # uploaded last
    assert "testing-secret-do-not-print" not in out + err

    from gpubake.provisioning.fetch import fetch

    dest = tmp_path / "back"
    fetch(f"s3://{bucket}/wan/tiny", dest, endpoint_url=endpoint, progress=False)
    assert (dest / "transformer" / "model.safetensors").read_bytes() == (src / "transformer" / "model.safetensors").read_bytes()


def test_push_weights_dry_run_and_bad_input(moto_s3, cli, tmp_path):
    endpoint, bucket, client = moto_s3.endpoint, moto_s3.bucket, moto_s3.client
    src = checkpoint(tmp_path / "ckpt")
    code, out, err = cli("push-weights", src, f"s3://{bucket}/x", "--endpoint-url", endpoint, "--dry-run", "--json")
    assert code == 0 and json.loads(out)["dry_run"] is True and "would upload" in err
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    code, _, err = cli("push-weights", tmp_path / "missing", f"s3://{bucket}/x", "--endpoint-url", endpoint)
    assert code == 2 and "not a directory" in err
    code, _, err = cli("push-weights", src, "https://example.com/x", "--endpoint-url", endpoint)
    assert code == 2 and "not an s3:// URI" in err
    code, _, err = cli("push-weights", src, "s3://no-such-bucket-zz/x", "--endpoint-url", endpoint)
    assert code == 2 and "no-such-bucket-zz" in err
