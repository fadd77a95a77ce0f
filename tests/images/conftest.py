"""Fixtures of the builder half: a real registry on loopback, private image stores, a tiny
OCI image for fast registry tests, and the demo image built once per session.

Everything starts here and stops here: Debian's `docker-registry` on a free 127.0.0.1 port
with htpasswd auth (bcrypt, `htpasswd -B`) and storage in a temp dir; buildah/skopeo
stores under the session's temp dir (GPUBAKE_STORAGE_ROOT), so tests never touch a
user's images. The slow inputs (bootstrap base, wheels, tiny model) are cached in
GPUBAKE_CACHE, which CI and repeated runs share (~/.cache/gpubake by default).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from testutil import edit_context_code, free_port, remove_store, stop_process

TIMESTAMP = 1700000000


def _have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


needs_buildah = pytest.mark.skipif(not _have("buildah", "skopeo"), reason="buildah/skopeo not installed (scripts/setup.sh)")
needs_registry = pytest.mark.skipif(
    not _have("docker-registry", "htpasswd", "skopeo"), reason="docker-registry/htpasswd not installed (scripts/setup.sh)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and buildah chroot builds need root")




@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    user: str
    password: str
    root: Path
    log: Path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """Debian's docker-registry with htpasswd auth on a free loopback port (plain HTTP)."""
    if not _have("docker-registry", "htpasswd", "skopeo"):
        pytest.skip("docker-registry/htpasswd/skopeo not installed (scripts/setup.sh)")
    root = tmp_path_factory.mktemp("registry")
    user, password = "gpubake-ci", "s3cret-" + os.urandom(8).hex()
    # htpasswd reads the password from stdin (-i): it never appears in argv.
    out = subprocess.run(["htpasswd", "-B", "-i", "-n", user], input=password, capture_output=True, text=True, check=True)
    (root / "htpasswd").write_text(out.stdout.strip() + "\n")
    port = free_port()
    (root / "config.yml").write_text(
        f"""version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {root / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {os.urandom(8).hex()}
auth:
  htpasswd:
    realm: gpubake-test
    path: {root / "htpasswd"}
"""
    )
    log = root / "registry.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            except urllib.error.HTTPError as exc:  # 401: up, and asking for credentials
                if exc.code == 401:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield Registry(host=f"127.0.0.1:{port}", user=user, password=password, root=root, log=log)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-file, one-layer OCI archive (seconds to push): for registry tests."""
    if not _have("skopeo"):
        pytest.skip("skopeo not installed")
    from gpubake.images.bootstrap import BootstrapInputs, write_oci_layout

    work = tmp_path_factory.mktemp("tiny-image")
    rootfs = work / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hello").write_text("hello from gpubake tests\n")
    layer = work / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = TIMESTAMP, 0, 0, "", ""
            if path.is_file():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    layout = work / "layout"
    layout.mkdir()
    write_oci_layout(layout, layer, BootstrapInputs("tiny", (), TIMESTAMP, arch="amd64"))
    archive = work / "tiny.oci.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout}", f"oci-archive:{archive}"], check=True, capture_output=True)
    return archive


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private containers-storage root for this test session (removed at the end)."""
    root = tmp_path_factory.mktemp("containers")
    yield root
    remove_store(root)


@dataclass
class DemoBuild:
    spec: object
    context: Path
    result: object  # BuildResult
    log: Path
    store: Path
    canary: str = ""


def build_demo(
    out: Path,
    store: Path,
    *,
    no_cache: bool = False,
    edit_code: str | None = None,
    target: str = "runpod",
    context_from: Path | None = None,
    tag: str | None = None,
    archive: bool = True,
):
    """Render the demo context (or copy `context_from`, model included: the same inputs
    even while the source tree is being edited), optionally append `edit_code` to
    gpubake/__init__.py in its gpubake wheel (a code-only change), build with buildah into `store`."""
    from gpubake.images.builders.base import BuildRequest
    from gpubake.images.builders.buildah import BuildahBuilder
    from gpubake.images.builders.storage import storage_at
    from gpubake.images.catalog import find
    from gpubake.images.model_layer import prepare_model
    from gpubake.images.render import RenderOptions, render_context

    spec = find("demo")
    ctx = out / "context"
    if context_from is not None:
        shutil.copytree(context_from, ctx, symlinks=True)
    else:
        render_context(spec, target, ctx, RenderOptions(timestamp=TIMESTAMP))
        prepare_model(spec, ctx)
    if edit_code is not None:
        edit_context_code(ctx, edit_code)
    builder = BuildahBuilder(storage_at(store), no_cache=no_cache, on_step=None)
    req = BuildRequest(
        spec=spec,
        target=target,
        context_dir=ctx,
        tag=tag or f"localhost/gpubake/demo:{target}",
        archive=out / "dist" / f"demo-{target}.oci.tar" if archive else None,
        timestamp=TIMESTAMP,
        log_file=out / "build.log",
    )
    return DemoBuild(spec=spec, context=ctx, result=builder.build(req), log=req.log_file, store=store)


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory, store_root: Path) -> DemoBuild:
    """The demo image, built once per session (layer cache kept in `store_root`/a).

    Built with a canary registry password in the environment: tests then check that it
    reached no log, no context file and no layer.
    """
    if not _have("buildah", "skopeo", "debootstrap") or os.geteuid() != 0:
        pytest.skip("needs root, buildah, skopeo and debootstrap (scripts/setup.sh)")
    canary = "canary-" + os.urandom(8).hex()
    saved = {k: os.environ.get(k) for k in ("GPUBAKE_REGISTRY_USER", "GPUBAKE_REGISTRY_PASSWORD")}
    os.environ.update(GPUBAKE_REGISTRY_USER="canary-user", GPUBAKE_REGISTRY_PASSWORD=canary)
    try:
        build = build_demo(tmp_path_factory.mktemp("demo-a"), store_root / "a")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    build.canary = canary
    return build


@pytest.fixture(scope="session")
def demo_builder():
    """`build_demo` for tests that build variants (conftest is not importable as a module)."""
    if not _have("buildah", "skopeo", "debootstrap") or os.geteuid() != 0:
        pytest.skip("needs root, buildah, skopeo and debootstrap (scripts/setup.sh)")
    return build_demo
