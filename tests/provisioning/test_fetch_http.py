"""fetch over HTTP against a real local server: verify, resume, refuse corruption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from testutil import free_port

from gpubake.errors import FetchError
from gpubake.provisioning.fetch import fetch, staging_dir
from gpubake.provisioning.manifest import MANIFEST_NAME, build_manifest, sha256_bytes, write_manifest

BIG = "transformer/diffusion_pytorch_model.safetensors"


def _publish(root: Path) -> dict:
    """A small checkpoint-like tree with one multi-MiB file, and its manifest."""
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text('{"a": 1}')
    (root / BIG).write_bytes(bytes(range(256)) * 12288)  # 3 MiB
    (root / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    manifest = build_manifest(root, fmt="bf16")
    write_manifest(root, manifest)
    return manifest


def _same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_fetch_directory_verifies_every_file(http_server, tmp_path):
    _publish(http_server.root)
    dest = tmp_path / "out" / "ckpt"
    res = fetch(http_server.url, dest, progress=False)
    assert res["verified"] == "manifest" and res["files"] == 3
    _same_tree(http_server.root, dest)
    assert not staging_dir(dest).exists()


def test_cut_stream_resumes_with_range_in_the_same_run(http_server, tmp_path):
    _publish(http_server.root)
    http_server.faults.cut_after, http_server.faults.cut_times = 1_000_000, 1
    dest = tmp_path / "ckpt"
    res = fetch(http_server.url, dest, jobs=1, progress=False)
    _same_tree(http_server.root, dest)
    ranges = [r for p, r in http_server.faults.requests if p == BIG and r]
    assert ranges and ranges[0].startswith("bytes=") and int(ranges[0][6:].rstrip("-")) > 0
    assert res["resumed_bytes"] > 0


def test_interrupted_run_leaves_nothing_complete_and_rerun_resumes(http_server, tmp_path):
    _publish(http_server.root)
    http_server.faults.die_at = 1_000_000  # the server always dies at this offset
    dest = tmp_path / "ckpt"
    with pytest.raises(FetchError, match="rerun to resume") as exc:
        fetch(http_server.url, dest, jobs=1, progress=False)
    assert "\n" not in str(exc.value)
    assert not dest.exists()
    part = staging_dir(dest) / (BIG + ".partial")
    assert part.is_file() and 0 < part.stat().st_size < (http_server.root / BIG).stat().st_size
    assert not (staging_dir(dest) / BIG).exists()  # no file that looks complete
    kept = part.stat().st_size

    http_server.faults.die_at = None
    http_server.faults.requests.clear()
    fetch(http_server.url, dest, jobs=1, progress=False)
    _same_tree(http_server.root, dest)
    assert (BIG, f"bytes={kept}-") in http_server.faults.requests
    assert not staging_dir(dest).exists()


def test_flipped_bytes_fail_verification_and_leave_nothing(http_server, tmp_path):
    _publish(http_server.root)
    http_server.faults.flip.add(BIG)
    dest = tmp_path / "ckpt"
    with pytest.raises(FetchError, match="sha256 mismatch") as exc:
        fetch(http_server.url, dest, progress=False)
    assert BIG in str(exc.value) and "\n" not in str(exc.value)
    assert not dest.exists()
    stage = staging_dir(dest)
    assert not (stage / BIG).exists() and not (stage / (BIG + ".partial")).exists()


def test_server_ignoring_range_restarts_the_file(http_server, tmp_path):
    _publish(http_server.root)
    http_server.faults.cut_after, http_server.faults.cut_times = 500_000, 1
    http_server.faults.ignore_range = True
    dest = tmp_path / "ckpt"
    fetch(http_server.url, dest, jobs=1, progress=False)
    _same_tree(http_server.root, dest)


def test_manifest_pin(http_server, tmp_path):
    _publish(http_server.root)
    good = sha256_bytes((http_server.root / MANIFEST_NAME).read_bytes())
    fetch(http_server.url, tmp_path / "a", sha256=good, progress=False)
    with pytest.raises(FetchError, match="manifest sha256"):
        fetch(http_server.url, tmp_path / "b", sha256="0" * 64, progress=False)
    assert not (tmp_path / "b").exists()


def test_single_file_with_sha256(http_server, tmp_path):
    _publish(http_server.root)
    url = http_server.url + "transformer/config.json"
    dest = tmp_path / "one"
    res = fetch(url, dest, sha256=sha256_bytes(b'{"a": 1}'), progress=False)
    assert (dest / "config.json").read_bytes() == b'{"a": 1}' and res["verified"] == "sha256"
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(url, tmp_path / "two", sha256="1" * 64, progress=False)
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize(
    ("status", "pattern"), [(404, "404"), (403, "credentials"), (401, "credentials"), (503, "kept failing")]
)
def test_http_errors_are_one_line(http_server, tmp_path, status, pattern):
    _publish(http_server.root)
    http_server.faults.status = status
    with pytest.raises(FetchError, match=pattern) as exc:
        fetch(http_server.url, tmp_path / "ckpt", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "ckpt").exists()


def test_unreachable_server(tmp_path):

    port = free_port()  # nothing listens there
    with pytest.raises(FetchError, match="unreachable") as exc:
        fetch(f"http://127.0.0.1:{port}/ckpt/", tmp_path / "ckpt", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "ckpt").exists()


def test_dry_run_writes_nothing(http_server, tmp_path):
    _publish(http_server.root)
    res = fetch(http_server.url, tmp_path / "ckpt", dry_run=True, progress=False)
    assert res["dry_run"] and res["files"] == 3 and BIG in res["paths"]
    assert not (tmp_path / "ckpt").exists() and not staging_dir(tmp_path / "ckpt").exists()


def test_disk_full_mid_write_cleans_up(http_server, small_fs):
    _publish(http_server.root)  # 3 MiB file into a 384 KiB filesystem
    dest = small_fs / "ckpt"
    with pytest.raises(FetchError, match="no space left") as exc:
        fetch(http_server.url, dest, jobs=1, progress=False)
    assert "\n" not in str(exc.value)
    assert list(small_fs.iterdir()) == []


def test_existing_dest_is_refused(http_server, tmp_path):
    _publish(http_server.root)
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "x").write_text("keep me")
    with pytest.raises(FetchError, match="already exists"):
        fetch(http_server.url, dest, progress=False)
    assert (dest / "x").read_text() == "keep me"
    shutil.rmtree(dest)
