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
from testutil import remove_store

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
        remove_store(store_root / "b")  # ~16 GB under vfs, ~2 GB under overlay
    assert second.digest == first.digest
    assert second.layers == first.layers
    assert read_archive_manifest(second.archive)[0] == first.digest


def test_demo_image_shape(demo_build):
    result = demo_build.result
    _, manifest = read_archive_manifest(result.archive)
    assert [layer["digest"] for layer in manifest["layers"]] == [layer["digest"] for layer in result.layers]
    assert result.builder == "buildah" and result.total_size == sum(layer["size"] for layer in result.layers)
    # layers are zstd-compressed (build-image's default), the target's tail is last, the
    # weights are the layers before the code, one per folder of the context's model/
    assert all(layer["mediaType"].endswith("+zstd") for layer in manifest["layers"])
    tail = _layer_names(result.archive, result.layers[-1]["digest"])
    assert sorted(n for n in tail if n not in ("opt", "opt/gpubake")) == ["opt/gpubake/image.json", "opt/gpubake/start.sh"]
    plan = [p.name for p in sorted((demo_build.context / "model").iterdir())]
    weights = result.layers[-2 - len(plan):-2]
    for name, layer in zip(plan, weights):
        names = _layer_names(result.archive, layer["digest"])
        assert names and all(n.startswith("opt/gpubake/model") or n in ("opt", "opt/gpubake") for n in names), name
    meta = _layer_names(result.archive, weights[-1]["digest"])
    assert "opt/gpubake/model/gpubake-manifest.json" in meta
    app = _layer_names(result.archive, result.layers[-2]["digest"])  # step 30: gpubake's wheel installed into the venv
    assert any(n.startswith("opt/gpubake/venv/lib/") and n.endswith("/site-packages/gpubake/__init__.py") for n in app), app[:20]
    assert not [n for n in app if n.startswith("opt/gpubake/app/")]  # the wheel itself was bind-mounted, not copied
    # port 22 is in the templates: the image has an sshd for start.sh to start, and no host
    # key in any layer (every instance of a public image would share it)
    names = [n for layer in result.layers for n in _layer_names(result.archive, layer["digest"])]
    assert "usr/sbin/sshd" in names
    assert not [n for n in names if n.startswith("etc/ssh/ssh_host_")]


def test_code_only_change_keeps_the_weight_layer(demo_build, demo_builder, tmp_path):
    """Rebuilt from the layer cache with one source file changed. Compared in the local
    store (uncompressed layer digests; export compresses each deterministically), which
    spares a second export. What differs is what a push of the change re-pushes."""
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
    differ = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert differ == [len(after) - 2]  # the app layer only: base, env, every weight layer and the tail are the same
    repush = sum(after[i]["size"] for i in differ)
    assert repush <= 100_000_000, f"a code-only change re-pushes {repush / 1e6:.1f} MB (uncompressed)"


def test_both_targets_share_every_layer_but_their_tail(demo_build, demo_builder, tmp_path):
    """The vastai build of the same context inputs, from the runpod build's layer cache:
    the same layer digests up to the target's tail (issue 17)."""
    from gpubake.images.builders.buildah import local_manifest
    from gpubake.images.builders.storage import storage_at

    runpod = local_manifest(storage_at(demo_build.store), "localhost/gpubake/demo:runpod")[1]
    ctx = tmp_path / "vastai-ctx"
    shutil.copytree(demo_build.context, ctx, symlinks=True)
    from gpubake.images.catalog import find
    from gpubake.images.render import RenderOptions, render_context

    fresh = tmp_path / "render"
    render_context(find("demo"), "vastai", fresh, RenderOptions(timestamp=TIMESTAMP))
    for name in ("Containerfile", "image.json", "start.sh"):  # the target's files, all else as the runpod build had it
        shutil.copyfile(fresh / name, ctx / name)
    vastai = demo_builder(tmp_path / "v", demo_build.store, target="vastai", context_from=ctx, archive=False).result.layers
    assert len(vastai) == len(runpod)
    assert vastai[:-1] == runpod[:-1] and vastai[-1] != runpod[-1]


def _layer_stream(blob) -> bytes:
    """A layer blob's tar bytes, whatever its compression (zstd by default, gzip with --compression gzip)."""
    data = blob.read()
    if data[:4] == b"\x28\xb5\x2f\xfd":  # zstd frame magic
        out = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
        return out.stdout
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def _layer_names(archive: Path, digest: str) -> list[str]:
    import io

    with tarfile.open(archive) as outer:
        blob = outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
        with tarfile.open(fileobj=io.BytesIO(_layer_stream(blob))) as layer:
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
            head = fh.read(4)
            fh.seek(0)
            if head == b"\x28\xb5\x2f\xfd":  # a zstd layer: scan what it unpacks to
                import io

                stream = io.BytesIO(_layer_stream(fh))
            else:
                stream = gzip.GzipFile(fileobj=fh) if head[:2] == b"\x1f\x8b" else fh
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
    assert [layer["digest"] for layer in manifest["layers"]][:-2] == [layer["digest"] for layer in demo_build.result.layers][:-2]
    for log in dist.glob("*.log"):
        assert registry.password not in log.read_text()
