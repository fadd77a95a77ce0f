"""Rendering the build context: complete, deterministic, atomic, secret-free, StrictUndefined."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
import sys
from pathlib import Path

import jinja2
import pytest

from gpubake.errors import GpubakeError
from gpubake.images import catalog, render

sys.path.insert(0, str(Path(__file__).parent))

SECRET = "s3cr3t-registry-pass-do-not-leak"


@pytest.fixture(scope="module")
def wan_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("ctx") / "wan"
    render.render_context(catalog.find("wan22-t2v-a14b-nvfp4"), "runpod", dest, render.RenderOptions(timestamp=1_700_000_000))
    return dest


def test_context_holds_every_part(wan_context: Path) -> None:
    names = {p.relative_to(wan_context).as_posix() for p in wan_context.rglob("*") if p.is_file()}
    for required in ("Containerfile", "image.pkr.hcl", "plugins.pkr.hcl", "image.json", "requirements.lock.txt",
                     f"app/{render.WHEEL_NAME}", "context.json"):
        assert required in names
    with zipfile.ZipFile(wan_context / "app" / render.WHEEL_NAME) as whl:
        assert {"gpubake/__init__.py", "gpubake/images/spec.py", "gpubake/templates/start.sh.j2"} <= set(whl.namelist())
    assert any(n.startswith("scripts/") and n.endswith(".sh") for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    manifest = json.loads((wan_context / "context.json").read_text())
    assert set(manifest["files"]) == names - {"context.json"}
    assert (wan_context / "requirements.lock.txt").read_bytes() == catalog.find("wan22-t2v-a14b-nvfp4").lock_path.read_bytes()


def test_image_json_describes_the_image(wan_context: Path) -> None:
    info = json.loads((wan_context / "image.json").read_text())
    assert info["name"] == "wan22-t2v-a14b-nvfp4" and info["target"] == "runpod"
    assert info["gpu_archs"] == ["sm_100", "sm_120"] and info["cuda"] == "13.0"
    assert info["min_driver"] == {"toolkit": "580.95.05", "minor_compat": "580.65.06"}
    assert "sm_120" in info["runnable_archs"]


def test_image_json_is_the_facts_the_boot_reads(wan_context: Path) -> None:
    from gpubake.provisioning.facts import ImageFacts

    facts = ImageFacts.read(wan_context / "image.json")
    assert facts == render.image_facts(catalog.find("wan22-t2v-a14b-nvfp4"), "runpod")
    assert facts.model.quantization == "nvfp4" and facts.throughput_key == facts.model.id == "wan2.2-t2v-a14b"


def test_containerfile_uses_the_bootstrap_base_and_layers_the_weights_before_the_code(wan_context: Path) -> None:
    spec = catalog.find("wan22-t2v-a14b-nvfp4")
    text = (wan_context / "Containerfile").read_text()
    assert spec.base.bootstrap is not None and f"FROM {render.base_reference(spec, 1_700_000_000)[0]}\n" in text
    ins = _instructions(text)
    weights = [i for i, line in enumerate(ins) if line.startswith("COPY model/")]
    plan = json.loads((wan_context / "weights.json").read_text())["layers"]
    assert [ins[i] for i in weights] == [f"COPY model/{layer['name']}/ /opt/gpubake/model/" for layer in plan]
    env = max(i for i, line in enumerate(ins) if "20-python-env.sh" in line)
    app = next(i for i, line in enumerate(ins) if line.startswith("RUN --mount=type=bind,source=app,"))  # the wheel
    assert env < weights[0] and weights == list(range(weights[0], weights[-1] + 1)) and weights[-1] < app
    assert ins[-1] == "COPY image.json start.sh /opt/gpubake/"  # the target's tail, last
    assert all(layer["bytes"] <= 4_000_000_000 for layer in plan)


def test_the_nvidia_cuda_base_stays_an_option(tmp_path: Path) -> None:
    """A spec may still name a pinned nvidia/cuda base: FROM it, and step 10 reads its dated apt mirror."""
    from gpubake_spec_helpers import write_spec  # tests/images (on sys.path above)

    from gpubake.images.spec import load_spec

    spec = load_spec(write_spec(tmp_path))
    assert spec.base.image and "nvidia/cuda" in spec.base.image and spec.python.version == "3.12"
    ctx = tmp_path / "ctx"
    render.render_context(spec, "runpod", ctx, render.RenderOptions(timestamp=1_700_000_000))
    ins = _instructions((ctx / "Containerfile").read_text())
    assert ins[0] == f"FROM {spec.base.image}"
    runs = [line for line in ins if line.startswith("RUN")]
    assert runs and all(f"GPUBAKE_APT_MIRROR={spec.base.apt_mirror}" in line for line in runs)
    assert all("GPUBAKE_TARGET" not in line for line in runs)


def _instructions(containerfile: str) -> list[str]:
    joined = containerfile.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("image", ["demo", "wan22-t2v-a14b-nvfp4-hopper"])
def test_targets_differ_only_in_their_tail(tmp_path: Path, image: str) -> None:
    """Both targets render the same instructions up to the target's label: with the layer cache
    (and in a registry) they share every layer but the last (test_repro compares digests)."""
    spec = catalog.find(image)
    out = {}
    for target in ("runpod", "vastai"):
        render.render_context(spec, target, tmp_path / target, render.RenderOptions(timestamp=1_700_000_000))
        out[target] = _instructions((tmp_path / target / "Containerfile").read_text())
    a, b = out["runpod"], out["vastai"]
    assert len(a) == len(b)
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    assert differ == [len(a) - 2], differ  # only `LABEL ai.gpubake.target=...`
    assert a[-2] == 'LABEL ai.gpubake.target="runpod"' and b[-2] == 'LABEL ai.gpubake.target="vastai"'
    for name in ("requirements.lock.txt", "weights.json"):
        assert (tmp_path / "runpod" / name).read_bytes() == (tmp_path / "vastai" / name).read_bytes()
    for rel in json.loads((tmp_path / "runpod" / "context.json").read_text())["files"]:
        if rel.startswith(("scripts/", "app/")):
            assert (tmp_path / "runpod" / rel).read_bytes() == (tmp_path / "vastai" / rel).read_bytes(), rel


def test_weights_at_boot_render_no_weight_layer(tmp_path: Path) -> None:
    spec = catalog.find("wan22-ti2v-5b")
    boot = spec.model_copy(update={"model": spec.model.model_copy(update={"at": "boot"})})
    render.render_context(boot, "runpod", tmp_path / "ctx", render.RenderOptions(timestamp=1_700_000_000))
    ins = _instructions((tmp_path / "ctx" / "Containerfile").read_text())
    assert not [line for line in ins if "model/" in line]
    assert json.loads((tmp_path / "ctx" / "weights.json").read_text()) == {
        "at": "boot", "layers": [], "model": "wan2.2-ti2v-5b", "policy": "default", "quantization": "nvfp4",
        "source": spec.model.source}


def test_image_json_records_the_pinned_revision(wan_context: Path) -> None:
    info = json.loads((wan_context / "image.json").read_text())
    assert info["model"]["revision"] == "5be7df9619b54f4e2667b2755bc6a756675b5cd7"
    assert info["model"]["source"].endswith("@" + info["model"]["revision"])


def test_files_have_fixed_modes_and_mtimes(wan_context: Path) -> None:
    for path in wan_context.rglob("*"):
        assert int(path.stat().st_mtime) == 1_700_000_000, path
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() or path.suffix == ".sh" else 0o644), path


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    spec = catalog.find("demo")
    a = render.render_context(spec, "vastai", tmp_path / "a")
    b = render.render_context(spec, "vastai", tmp_path / "b")
    assert a.files == b.files and a.files
    assert (tmp_path / "a" / "context.json").read_bytes() == (tmp_path / "b" / "context.json").read_bytes()
    c = render.render_context(spec, "runpod", tmp_path / "c")
    assert c.files["image.pkr.hcl"] != a.files["image.pkr.hcl"]  # the target is part of the context


def test_no_secret_reaches_the_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBAKE_REGISTRY_PASSWORD", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET + "-hf")
    push = render.PushTarget.parse("registry.example.com:5000/team/demo:v1")
    render.render_context(catalog.find("demo"), "runpod", tmp_path / "ctx", render.RenderOptions(push=push))
    for path in (tmp_path / "ctx").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    hcl = (tmp_path / "ctx" / "image.pkr.hcl").read_text()
    assert 'post-processor "docker-push"' in hcl and "login_password = var.registry_password" in hcl
    assert 'login_server   = "registry.example.com:5000"' in hcl


def test_dest_must_be_new_or_empty_and_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(GpubakeError, match="full exists and is not an empty directory"):
        render.render_context(catalog.find("demo"), "runpod", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"

    def broken(spec, target, image_ref):  # a part failing half-way through the render
        raise OSError("disk full")

    monkeypatch.setattr(render, "_marketplace_payload", broken)
    with pytest.raises(OSError):
        render.render_context(catalog.find("demo"), "runpod", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial dir, no temp dir


def test_templates_are_strict_about_missing_variables() -> None:
    env = render.environment()
    assert env.undefined is jinja2.StrictUndefined
    ctx = render.template_context(catalog.find("demo"), "runpod", render.RenderOptions())
    for name in ("image.pkr.hcl.j2", "Containerfile.j2"):
        assert render.render_template(name, ctx)
        for missing in ("base_ref", "name"):
            partial = {k: v for k, v in ctx.items() if k != missing}
            with pytest.raises(render.RenderError, match=rf"^templates/{name}: '{missing}' is undefined$"):
                render.render_template(name, partial)


def test_hcl_string_escapes_template_sequences() -> None:
    assert render.hcl_string('a "b" ${c} %{d}\n') == '"a \\"b\\" $${c} %%{d}\\n"'


@pytest.mark.parametrize("ref", ["demo:v1", "localhost/demo", "https://r.io/a:b", "r.io/A:b", "ghcr.io/x/y:"])
def test_bad_push_refs(ref: str) -> None:
    with pytest.raises(GpubakeError, match=r"^--push: "):
        render.PushTarget.parse(ref)


def test_good_push_ref() -> None:
    p = render.PushTarget.parse("localhost:5000/gpubake/demo:runpod")
    assert (p.server, p.repository, p.tag, p.ref) == ("localhost:5000", "localhost:5000/gpubake/demo", "runpod", "localhost:5000/gpubake/demo:runpod")


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed (scripts/setup.sh installs Debian's packer 1.6.6)")
def test_rendered_packer_template_validates(wan_context: Path) -> None:
    proc = subprocess.run(["packer", "validate", "image.pkr.hcl"], cwd=wan_context, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ gpubake's wheel


def _tracked_copy(dest: Path) -> Path:
    """A git checkout holding this repository's tracked files (the package and its build files)."""
    repo = Path(__file__).resolve().parents[2]
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--", "pyproject.toml", "README.md", "src/gpubake"],
                            capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (p.decode() for p in listed)):
        if (repo / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / rel, dest / rel)
    git = ["git", "-C", str(dest), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tracked"], check=True)
    return dest / "src" / "gpubake"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_wheel_holds_tracked_files_only(tmp_path: Path) -> None:
    """A stray .env, a nested .git with credentials, an untracked module: none reaches the wheel."""
    from gpubake.images import app_wheel

    pkg = _tracked_copy(tmp_path / "repo")
    (pkg / ".env").write_text("HF_TOKEN=hf_stray_secret\n")
    (pkg / "images" / ".git").mkdir()
    (pkg / "images" / ".git" / "credentials").write_text("https://u:stray_secret@github.com\n")
    (pkg / "stray.json").write_text('{"secret": "stray_secret"}\n')  # matches package-data, untracked
    first = app_wheel.place_app_wheel(tmp_path / "a", tmp_path / "cache", pkg=pkg)
    with zipfile.ZipFile(first.path) as whl:
        names = whl.namelist()
        assert "gpubake/__init__.py" in names and "gpubake/templates/start.sh.j2" in names
        assert not [n for n in names if any(part.startswith(".") for part in n.split("/")) or "stray" in n]
        assert all(b"stray_secret" not in whl.read(n) for n in names)
    assert first.origin == "git" and first.left_out == ["src/gpubake/stray.json"]
    # Same files, same bytes: built again without the cache, the wheel is identical.
    again = app_wheel.place_app_wheel(tmp_path / "b", tmp_path / "cache-2", pkg=pkg)
    assert again.sha256 == first.sha256 and again.path.read_bytes() == first.path.read_bytes()
    # A tracked change makes another wheel.
    (pkg / "__init__.py").write_text((pkg / "__init__.py").read_text() + "\n# changed\n")
    assert app_wheel.place_app_wheel(tmp_path / "c", tmp_path / "cache", pkg=pkg).sha256 != first.sha256


def test_wheel_of_an_installed_package_skips_dotfiles_and_bytecode(tmp_path: Path) -> None:
    """No checkout (an installed gpubake): the package's files, no dotfile, no __pycache__."""
    from gpubake.images import app_wheel

    pkg = tmp_path / "site" / "gpubake"
    shutil.copytree(app_wheel.package_dir(), pkg, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    (pkg / ".env").write_text("HF_TOKEN=hf_stray_secret\n")
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0stray_secret")
    (pkg / "images" / "secret-link.json").symlink_to("/etc/hostname")
    wheel = app_wheel.place_app_wheel(tmp_path / "out", tmp_path / "cache", pkg=pkg)
    with zipfile.ZipFile(wheel.path) as whl:
        names = whl.namelist()
        metadata = whl.read("gpubake-0.1.0.dist-info/METADATA").decode()
        entry_points = whl.read("gpubake-0.1.0.dist-info/entry_points.txt").decode()
    assert wheel.origin == "installed" and "gpubake/cli.py" in names and "gpubake/images/catalog/demo.toml" in names
    assert not [n for n in names if "/." in n or "__pycache__" in n or n.endswith(".pyc") or "secret-link" in n]
    assert "Name: gpubake" in metadata and "gpubake = gpubake.cli:main" in entry_points


def test_context_ships_gpubake_as_a_wheel_not_a_tree(wan_context: Path) -> None:
    names = [p.relative_to(wan_context).as_posix() for p in wan_context.rglob("*")]
    assert [n for n in names if n.startswith("app/")] == [f"app/{render.WHEEL_NAME}"]
    assert not [n for n in names if any(part.startswith(".") for part in n.split("/"))]
    sha = json.loads((wan_context / "context.json").read_text())["files"][f"app/{render.WHEEL_NAME}"]
    # the Containerfile installs it from a bind mount, naming its sha256 (buildah's cache key)
    assert f"scripts/30-gpubake.sh app/{render.WHEEL_NAME} {sha}" in (wan_context / "Containerfile").read_text()


# ------------------------------------------------------------------ --render-only destinations


def test_failed_render_keeps_an_existing_empty_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never delete what the command did not create: the empty DIR given stays; the parents it made go."""
    (tmp_path / "given").mkdir()

    def broken(spec, target, image_ref):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render, "_marketplace_payload", broken)
    with pytest.raises(OSError):
        render.render_context(catalog.find("demo"), "runpod", tmp_path / "given")
    assert (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())
    with pytest.raises(OSError):
        render.render_context(catalog.find("demo"), "runpod", tmp_path / "new" / "deeper" / "ctx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given"]
    monkeypatch.undo()
    render.render_context(catalog.find("demo"), "runpod", tmp_path / "given")  # and it renders into it
    assert (tmp_path / "given" / "context.json").is_file()


def test_destination_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GpubakeError, match=r"^--render-only: .*afile/ctx: .*afile is not a directory$"):
        render.render_context(catalog.find("demo"), "runpod", tmp_path / "afile" / "ctx")
    assert (tmp_path / "afile").read_text() == "x"


def test_the_hopper_image_renders_a_buildable_context(tmp_path: Path) -> None:
    """CI's fast check of the Containerfile bench/bench_gpu_image.py builds (docs/benchmarks.md):
    the bootstrap base with what Triton needs, the lock's sources, the steps, the weight layers."""
    from gpubake.images import bootstrap
    from gpubake.images.builders import wheels

    spec = catalog.find("wan22-t2v-a14b-nvfp4-hopper")
    ctx = tmp_path / "hopper"
    render.render_context(spec, "runpod", ctx, render.RenderOptions(timestamp=1_700_000_000))
    ins = _instructions((ctx / "Containerfile").read_text())
    base = bootstrap.inputs_for(spec, 1_700_000_000)
    assert ins[0] == f"FROM {base.ref()}" and {"gcc", "libc6-dev", "python3-dev", "python3-venv"} <= set(base.packages)
    assert [line.split()[-1] if "30-gpubake" not in line else "30-gpubake.sh" for line in ins if line.startswith("RUN")] \
        == ["scripts/10-system.sh", "scripts/20-python-env.sh", "30-gpubake.sh"]
    assert all("GPUBAKE_PYTHON=3.11" in line for line in ins if line.startswith("RUN"))
    lock = wheels.parse_lock((ctx / "requirements.lock.txt").read_text())
    pins = dict(lock.pins())
    assert pins["torch"] == "2.11.0" and "triton" in pins and pins["fa3-fwd"] == "0.0.3"
    assert lock.index_url == "https://pypi.org/simple" and not lock.extra_index_urls  # CUDA's user space: nvidia-* wheels
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-cuda-runtime"} <= set(pins)
    facts = json.loads((ctx / "image.json").read_text())
    assert facts["cuda"] == spec.cuda == "13.0" and facts["gpu_archs"] == ["sm_89", "sm_90"]
    plan = json.loads((ctx / "weights.json").read_text())["layers"]
    assert [line for line in ins if line.startswith("COPY model/")] == [f"COPY model/{x['name']}/ /opt/gpubake/model/" for x in plan]
