"""The demo image end to end: reproducible digests, weights untouched by code changes,
no secret anywhere, a registry round trip, and the CLI's one-line registry error.

Costly (two full demo builds, a cached third one): marked slow and buildah.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gpubake.images import registry as reg
from gpubake.images.builders.buildah import read_archive_manifest

pytestmark = [pytest.mark.slow, pytest.mark.buildah]
TIMESTAMP = 1700000000


def test_demo_builds_twice_to_the_same_digest(demo_build, demo_builder, store_root, tmp_path):
    first = demo_build.result
    # A second store and no layer cache: every step runs again, nothing is reused.
    try:
        # Same inputs: a copy of the first build's context (model included), so a neighbour
        # editing the source tree meanwhile cannot make the digests differ.
        second = demo_builder(tmp_path, store_root / "b", no_cache=True, context_from=demo_build.context).result
    finally:
        shutil.rmtree(store_root / "b", ignore_errors=True)  # gigabytes under vfs
    assert second.digest == first.digest
    assert second.layers == first.layers
    assert read_archive_manifest(second.archive)[0] == first.digest


def test_demo_image_shape(demo_build):
    result = demo_build.result
    _, manifest = read_archive_manifest(result.archive)
    assert [layer["digest"] for layer in manifest["layers"]] == [layer["digest"] for layer in result.layers]
    assert result.builder == "buildah" and result.total_size == sum(layer["size"] for layer in result.layers)
    last = _layer_names(result.archive, result.layers[-1]["digest"])
    assert last and all(name.startswith("opt/gpubake/model") or name in ("opt", "opt/gpubake") for name in last)
    assert "opt/gpubake/model/gpubake-manifest.json" in last
    # port 22 is in the templates: the image has an sshd for start.sh to start, and no host
    # key in any layer (every instance of a public image would share it)
    names = [n for layer in result.layers for n in _layer_names(result.archive, layer["digest"])]
    assert "usr/sbin/sshd" in names
    assert not [n for n in names if n.startswith("etc/ssh/ssh_host_")]


def test_code_only_change_keeps_the_weight_layer(demo_build, demo_builder, tmp_path):
    """Rebuilt from the layer cache with one source file changed. Compared in the local
    store (uncompressed layer digests; export compresses each deterministically), which
    spares a second export."""
    from gpubake.images.builders.buildah import local_manifest
    from gpubake.images.builders.storage import storage_at

    before = local_manifest(storage_at(demo_build.store), "localhost/gpubake/demo:runpod")[1]
    changed = demo_builder(
        tmp_path,
        demo_build.store,
        edit_code="\n# a code-only change\n",
        context_from=demo_build.context,
        tag="localhost/gpubake/demo:code-change",
        archive=False,
    ).result
    after = changed.layers
    assert len(after) == len(before) == len(demo_build.result.layers)
    assert after[-1] == before[-1]  # the weights: same layer, nothing to re-push
    assert after[:5] == before[:5]  # base, scripts, system, lock, Python env: untouched
    assert after[5] != before[5]  # the app layer carries the change
    assert after[6] == before[6]  # image.json + start.sh


def _layer_names(archive: Path, digest: str) -> list[str]:
    with tarfile.open(archive) as outer:
        blob = outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
        with tarfile.open(fileobj=gzip.GzipFile(fileobj=blob)) as layer:
            return layer.getnames()


def _contains(stream, needle: bytes) -> bool:
    tail = b""
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        if needle in tail + chunk:
            return True
        tail = chunk[-len(needle) :]
    return False


def test_secret_in_no_log_context_or_layer(demo_build):
    canary = demo_build.canary.encode()
    assert canary
    assert canary not in demo_build.log.read_bytes()
    for path in demo_build.context.rglob("*"):
        if path.is_file():
            assert canary not in path.read_bytes(), path
    with tarfile.open(demo_build.result.archive) as outer:
        for member in outer.getmembers():
            fh = outer.extractfile(member)
            if fh is None:
                continue
            head = fh.read(2)
            fh.seek(0)
            stream = gzip.GzipFile(fileobj=fh) if head == b"\x1f\x8b" else fh
            assert not _contains(stream, canary), member.name


@pytest.mark.registry
def test_demo_push_round_trip(demo_build, registry, monkeypatch, tmp_path):
    monkeypatch.setenv(reg.USER_ENV, registry.user)
    monkeypatch.setenv(reg.PASSWORD_ENV, registry.password)
    log = tmp_path / "push.log"
    result = reg.push(demo_build.result.archive, f"{registry.host}/gpubake/demo:runpod", log_file=log)
    assert result.digest == demo_build.result.digest
    assert registry.password not in log.read_text()
    assert registry.password.encode() not in registry.log.read_bytes()


@pytest.mark.registry
def test_cli_wrong_password_is_one_line_and_nonzero(demo_build, registry, tmp_path):
    """build-image --push through the CLI (a cached build), refused with one line naming the
    registry and the user."""
    env = {
        **os.environ,
        "GPUBAKE_STORAGE_ROOT": str(demo_build.store),
        "SOURCE_DATE_EPOCH": str(TIMESTAMP),
        reg.USER_ENV: registry.user,
        reg.PASSWORD_ENV: "wrong-" + registry.password,
    }
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-c", "from gpubake.cli import build_image_main; build_image_main()",
         "--target", "runpod", "--dist", str(dist), "--push", f"{registry.host}/gpubake/demo:cli", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: registry {registry.host} refused the credentials for user {registry.user}"]
    assert "Traceback" not in proc.stderr and registry.password not in proc.stderr + proc.stdout
    # Built (from the layer cache) before the push was refused; its weights are the same layer.
    _, manifest = read_archive_manifest(dist / "demo-runpod.oci.tar")
    assert manifest["layers"][-1]["digest"] == demo_build.result.layers[-1]["digest"]
    for log in dist.glob("*.log"):
        assert registry.password not in log.read_text()
