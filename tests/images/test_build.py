"""Builders: detection, the buildah flow on small contexts (errors, disk full), the docker
command line, the Containerfile the template renders for the demo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from build_fakes import RecordingRunner  # noqa: E402
from testutil import remove_store  # noqa: E402

from gpubake.errors import BuildError
from gpubake.images.builders.base import BuildRequest
from gpubake.images.builders.buildah import BuildahBuilder
from gpubake.images.builders.detect import detect_builder
from gpubake.images.builders.docker import DockerBuilder
from gpubake.images.builders.storage import storage_at
from gpubake.images.catalog import find
from gpubake.images.render import RenderOptions, render_context

EPOCH = 1700000000
REPO = Path(__file__).resolve().parents[2]


def _request(spec, ctx: Path, out: Path, archive: bool = True) -> BuildRequest:
    return BuildRequest(
        spec=spec,
        target="runpod",
        context_dir=ctx,
        tag="localhost/gpubake/test:runpod",
        archive=out / "dist" / "test-runpod.oci.tar" if archive else None,
        timestamp=EPOCH,
        log_file=out / "build.log",
    )


# ------------------------------------------------------------------ detection


def test_no_builder_on_path_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError) as info:
        detect_builder(None)
    assert str(info.value).startswith("no image builder found (buildah, docker or packer): install buildah and skopeo")
    assert "\n" not in str(info.value)


def test_no_builder_through_the_cli_exits_nonzero(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path / "no-tools")}
    proc = subprocess.run(
        [sys.executable, "-c", "from gpubake.cli import build_image_main; build_image_main()", "--target", "runpod",
         "--dist", str(tmp_path / "dist")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: no image builder found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "dist").glob("*.oci.tar")) if (tmp_path / "dist").exists() else True


def test_preferred_builder_unknown_or_unusable(monkeypatch, tmp_path):
    with pytest.raises(BuildError, match=r"^--builder: unknown builder 'kaniko'"):
        detect_builder("kaniko")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError, match=r"^--builder buildah: not usable here; install buildah and skopeo"):
        detect_builder("buildah")


def test_buildah_detected_first_when_installed():
    if not (shutil.which("buildah") and shutil.which("skopeo")):
        pytest.skip("buildah not installed")
    assert detect_builder(None).name == "buildah"


# ------------------------------------------------------------------ docker (command line only)


def test_docker_command_is_reproducible_and_secret_free(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBAKE_REGISTRY_PASSWORD", "do-not-leak-me")
    spec = find("demo")
    req = _request(spec, tmp_path / "ctx", tmp_path)
    cmd = DockerBuilder().command(req, tmp_path / "dist" / ".partial")
    assert cmd[:3] == ["docker", "buildx", "build"]
    assert f"SOURCE_DATE_EPOCH={EPOCH}" in cmd and "--provenance=false" in cmd
    out = cmd[cmd.index("--output") + 1]
    assert out.startswith("type=oci,dest=") and "rewrite-timestamp=true" in out and f"name={req.tag}" in out
    assert cmd[-1] == str(tmp_path / "ctx") and cmd[cmd.index("--file") + 1] == str(tmp_path / "ctx" / "Containerfile")
    assert "do-not-leak-me" not in " ".join(cmd)


def test_docker_refuses_bootstrap_bases(tmp_path):
    spec = find("demo")
    with pytest.raises(BuildError, match=r"bootstrap base; build it with --builder buildah"):
        DockerBuilder().build(_request(spec, tmp_path, tmp_path))


# ------------------------------------------------------------------ the demo Containerfile


@pytest.fixture(scope="module")
def demo_context(tmp_path_factory):
    ctx = tmp_path_factory.mktemp("render") / "ctx"
    render_context(find("demo"), "runpod", ctx, RenderOptions(timestamp=EPOCH))
    return ctx


def _instructions(containerfile: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", containerfile)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_weights_come_before_the_code_and_the_target_tail_is_last(demo_context):
    ins = _instructions((demo_context / "Containerfile").read_text())
    assert ins[0].startswith("FROM localhost/gpubake/bootstrap-bookworm:")
    assert ins[-1] == "COPY image.json start.sh /opt/gpubake/" and ins[-2] == 'LABEL ai.gpubake.target="runpod"'
    steps = [i for i, line in enumerate(ins) if line.startswith("RUN")]
    order = [re.search(r"scripts/(\d\d-[a-z-]+\.sh)", ins[i]).group(1) for i in steps]
    assert order == ["10-system.sh", "20-python-env.sh", "30-gpubake.sh"]
    lock = next(i for i, line in enumerate(ins) if "requirements.lock.txt" in line)
    weights = [i for i, line in enumerate(ins) if line.startswith("COPY model/")]
    # gpubake's wheel, bind-mounted (no copy in a layer), named with its sha256 (the cache key)
    app = next(i for i, line in enumerate(ins) if line.startswith("RUN --mount=type=bind,source=app,"))
    assert re.search(r"30-gpubake\.sh app/gpubake-[^ ]+\.whl [0-9a-f]{64}$", ins[app])
    assert steps[0] < lock < steps[1] < weights[0] and weights[-1] < app  # code changes rebuild neither env nor weights
    assert [ins[i] for i in weights] == [f"COPY model/{name}/ /opt/gpubake/model/" for name in
                                         ("00-text_encoder", "01-vae", "02-transformer", "03-transformer_2", "04-meta")]
    assert not any(line.startswith("RUN") for line in ins[app + 1:])  # nothing runs after the code


def test_steps_named_by_the_containerfile_ship_in_the_context(demo_context):
    text = (demo_context / "Containerfile").read_text()
    for script in re.findall(r"scripts/(\d\d-[a-z-]+\.sh)", text):
        assert (demo_context / "scripts" / script).is_file(), script
    assert (demo_context / "scripts" / "00-env.sh").is_file()  # sourced by every step


def test_context_names_no_host_path_and_no_secret(tmp_path, monkeypatch):
    secret = "pa55-" + os.urandom(6).hex()
    monkeypatch.setenv("GPUBAKE_REGISTRY_PASSWORD", secret)
    monkeypatch.setenv("GPUBAKE_REGISTRY_USER", "someone")
    ctx = tmp_path / "ctx"
    render_context(find("demo"), "vastai", ctx, RenderOptions(timestamp=EPOCH))
    text = (ctx / "Containerfile").read_text()
    assert str(Path.home()) not in text and "/opt/wheels" not in text and str(REPO) not in text
    for path in ctx.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------ buildah on small contexts


@pytest.fixture(scope="module")
def small_store(store_root):
    """The bootstrap base imported into a private store (debootstrap once, then cached)."""
    if os.geteuid() != 0 or not (shutil.which("buildah") and shutil.which("debootstrap")):
        pytest.skip("needs root, buildah and debootstrap")
    from gpubake.images import bootstrap

    storage = storage_at(store_root / "small")
    spec = find("demo")
    ref = bootstrap.ensure_base(bootstrap.inputs_for(spec, EPOCH), storage, log_file=store_root / "bootstrap.log")
    return storage, ref, spec


def _small_context(tmp_path: Path, base: str, body: str) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "model").mkdir(parents=True)
    (ctx / "model" / "weights.bin").write_bytes(os.urandom(4096))
    (ctx / "requirements.lock.txt").write_text("# nothing\n")
    (ctx / "Containerfile").write_text(f"FROM {base}\n{body}COPY model/ /opt/gpubake/model/\n")
    return ctx


@pytest.mark.buildah
def test_failing_step_is_one_line_with_the_log_and_leaves_no_archive(tmp_path, small_store):
    storage, base, spec = small_store
    ctx = _small_context(tmp_path, base, "RUN echo 'pip: no matching distribution for torch' >&2 && exit 3\n")
    req = _request(spec, ctx, tmp_path)
    with pytest.raises(BuildError) as info:
        BuildahBuilder(storage, on_step=None).build(req)
    msg = str(info.value)
    assert "\n" not in msg and "buildah bud of demo (runpod) failed" in msg
    assert f"full log: {req.log_file}" in msg
    assert "no matching distribution for torch" in req.log_file.read_text()
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())
    left = subprocess.run(["buildah", *storage.buildah_args(), "containers", "--quiet"], capture_output=True, text=True, check=True)
    assert left.stdout.split() == []  # --force-rm: the failed step's container is gone too


@pytest.mark.buildah
def test_context_without_model_is_refused(tmp_path, small_store):
    storage, base, spec = small_store
    ctx = _small_context(tmp_path, base, "")
    shutil.rmtree(ctx / "model")
    with pytest.raises(BuildError, match=r"no model/ \(gpubake.images.model_layer.prepare_model places it\)"):
        BuildahBuilder(storage, on_step=None).build(_request(spec, ctx, tmp_path))


@pytest.mark.buildah
def test_small_build_exports_a_valid_archive(tmp_path, small_store):
    storage, base, spec = small_store
    ctx = _small_context(tmp_path, base, "RUN mkdir -p /opt/gpubake && echo ok > /opt/gpubake/ok\n")
    result = BuildahBuilder(storage, on_step=None).build(_request(spec, ctx, tmp_path))
    assert result.archive.is_file() and result.digest.startswith("sha256:")
    assert len(result.layers) == 3 and result.total_size == sum(layer["size"] for layer in result.layers)
    out = subprocess.run(["skopeo", "inspect", f"oci-archive:{result.archive}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in result.archive.parent.iterdir()] == [result.archive.name]  # no temp left


@pytest.mark.buildah
def test_disk_full_export_leaves_nothing_in_dist(tmp_path, small_store):
    storage, base, spec = small_store
    dist = tmp_path / "dist"
    dist.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(dist)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        ctx = _small_context(tmp_path, base, "")
        req = _request(spec, ctx, tmp_path)
        with pytest.raises(BuildError) as info:
            BuildahBuilder(storage, on_step=None).build(req)
        assert "export to" in str(info.value) and "\n" not in str(info.value)
        assert "no space left on device" in str(info.value).lower()
        assert list(dist.iterdir()) == []  # neither the archive nor a partial file
    finally:
        subprocess.run(["umount", str(dist)], check=False)


@pytest.mark.buildah
def test_build_runs_exactly_its_plan(tmp_path, small_store, store_root):
    """A real build whose process runner records each command: the commands are `plan(req)`, in order."""
    _, base, spec = small_store
    storage = storage_at(store_root / "planned")  # a store without the base: the plan imports it
    ctx = _small_context(tmp_path, base, "RUN mkdir -p /opt/gpubake && echo planned > /opt/gpubake/planned\n")
    req = _request(spec, ctx, tmp_path)
    runner = RecordingRunner(execute=True)
    builder = BuildahBuilder(storage, on_step=None, runner=runner)
    planned = builder.plan(req)
    result = builder.build(req)
    assert runner.calls == planned
    assert [s.what for s in planned] == ["import bootstrap base", "buildah bud of demo (runpod)", f"export to {req.archive}"]
    bud = planned[1].argv
    assert "--identity-label=false" in bud and "--pull=false" in bud and planned[1].env == {"BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": storage.driver}
    assert result.archive.is_file() and [p.name for p in result.archive.parent.iterdir()] == [result.archive.name]
    assert [s.what for s in builder.plan(req)][0] == "buildah bud of demo (runpod)"  # the base is there now: no import


# ------------------------------------------------------------------ storage driver


def test_storage_driver_auto_is_overlay_only_where_the_probe_mounts(tmp_path, monkeypatch):
    """`auto` (the default) asks the kernel beside the store; a forced driver is taken as is."""
    from gpubake.images.builders import storage

    monkeypatch.delenv("GPUBAKE_STORAGE_DRIVER", raising=False)
    storage._overlay_mounts.cache_clear()
    refused = subprocess.CompletedProcess(["mount"], 32, b"", b"mount: permission denied")
    monkeypatch.setattr(storage.subprocess, "run", lambda *a, **k: refused)
    monkeypatch.setattr(storage.os, "geteuid", lambda: 0)
    assert storage_at(tmp_path / "a" / "store").driver == "vfs"
    assert list(tmp_path.iterdir()) == []  # the probe's temp dir is gone, the store not made
    storage._overlay_mounts.cache_clear()
    monkeypatch.setattr(storage.os, "geteuid", lambda: 1000)  # rootless: no probe, vfs
    monkeypatch.setattr(storage.subprocess, "run", lambda *a, **k: pytest.fail("probed as non-root"))
    assert storage_at(tmp_path).driver == "vfs"
    monkeypatch.setenv("GPUBAKE_STORAGE_DRIVER", "overlay")
    assert storage_at(tmp_path).driver == "overlay" and storage_at(tmp_path).root == tmp_path / "overlay" / "storage"
    storage._overlay_mounts.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="the overlay probe mounts as root")
def test_overlay_probe_mounts_for_real_and_leaves_nothing(tmp_path, monkeypatch):
    from gpubake.images.builders import storage

    monkeypatch.delenv("GPUBAKE_STORAGE_DRIVER", raising=False)
    storage._overlay_mounts.cache_clear()
    works = storage._overlay_mounts(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()  # unmounted
    direct = tmp_path / "d"
    for name in ("l", "u", "w", "m"):
        (direct / name).mkdir(parents=True)
    opts = f"lowerdir={direct / 'l'},upperdir={direct / 'u'},workdir={direct / 'w'}"
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(direct / "m")], capture_output=True)
    if mounted.returncode == 0:
        subprocess.run(["umount", str(direct / "m")], check=True)
    assert works == (mounted.returncode == 0)
    assert storage_at(tmp_path / "store").driver == ("overlay" if works else "vfs")
    storage._overlay_mounts.cache_clear()


@pytest.mark.buildah
def test_small_build_on_vfs_is_reproducible_and_says_its_driver(tmp_path, small_store, store_root):
    """The fallback driver, forced: two no-cache builds of one small context, one digest.

    Digests are reproducible per driver, not across them (overlay's RUN layers also record
    /run, a mount point, which vfs's do not: seen here), so the result names its driver.
    """
    from gpubake.images import bootstrap

    storage, base, spec = small_store
    vfs = storage_at(store_root / "small-vfs", driver="vfs")
    try:
        bootstrap.ensure_base(bootstrap.inputs_for(spec, EPOCH), vfs, log_file=store_root / "bootstrap-vfs.log")
        ctx = _small_context(tmp_path, base, "RUN mkdir -p /opt/gpubake && echo vfs > /opt/gpubake/vfs\n")
        (ctx / "model" / "weights.bin").write_bytes(b"\1" * 4096)
        results = [BuildahBuilder(vfs, no_cache=True, on_step=None).build(_request(spec, ctx, tmp_path / str(n))) for n in (1, 2)]
    finally:
        remove_store(store_root / "small-vfs")
    assert results[0].digest == results[1].digest and results[0].layers == results[1].layers
    assert results[0].to_json()["storage_driver"] == "vfs"
