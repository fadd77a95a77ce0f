"""`gpubake remote provision USER@HOST --image NAME` through fabric against a real sshd on loopback.

The "host" is this machine as root (conftest `sshd`). What is real: the SSH session, the
SFTP uploads, pip installing the image's lock with `--require-hashes` into a venv on the host
(a one-package lock: a wheel this test builds, served from a local folder with
`--no-index`, so pip checks its hash exactly as it checks torch's), gpubake's own wheel, the
checkpoint (copied and checked with `sha256sum -c`, or fetched by the host's `gpubake fetch`
from an HTTP server on loopback against the pinned manifest), and the self-test, which the
host's gpubake runs for real on the tiny NVFP4 checkpoint on CPU. What is not: the NVIDIA
driver; `nvidia-smi` is a small script that prints a version (`--nvidia-smi`).

The venv is made beforehand and sees this checkout's dependencies through a .pth file (no
network, no torch download); provision installs the lock and gpubake into it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.sshd

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
SPEC = """\
schema_version = 1
name = "{name}"
description = "Provision test image"
targets = ["runpod", "vastai"]
gpu_archs = {archs}
cpu_ok = {cpu_ok}
cuda = "{cuda}"
torch = "{torch}"

[base.bootstrap]
suite = "bookworm"
packages = ["python3"]

[python]
version = "{python}"
lock = "locks/{name}.txt"

[model]
id = "tiny-wan2.2"
quantization = "nvfp4"
source = "generate:tiny"

[runtime]
ports = [{{ port = 8000, protocol = "http", name = "api" }}]
env = {{ GPUBAKE_MODEL_DIR = "/opt/gpubake/model", GPUBAKE_IMAGE = "{name}" }}
entrypoint = ["/opt/gpubake/start.sh"]
container_disk_gb = 10
volume_disk_gb = 0
volume_mount = "/workspace"
"""


def probe_wheel(folder: Path) -> tuple[Path, str]:
    """A real, minimal wheel (`gpubake_probe` 0.1.0) and its sha256, for a one-line lock."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpubake_probe-0.1.0-py3-none-any.whl"
    files = {
        "gpubake_probe/__init__.py": b"VALUE = 42\n",
        "gpubake_probe-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gpubake-probe\nVersion: 0.1.0\n",
        "gpubake_probe-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("gpubake_probe-0.1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
        z.writestr(zipfile.ZipInfo("gpubake_probe-0.1.0.dist-info/RECORD", (2020, 1, 1, 0, 0, 0)), "\n".join(record) + "\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gpubake_wheel(tmp_path_factory) -> Path:
    from gpubake.images.marketplace.remote import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))  # what provision does without --wheel


def make_spec(tmp_path: Path, name: str, *, cuda: str = "none", python: str = PY, lock_hash: str | None = None) -> Path:
    wheel, sha = probe_wheel(tmp_path / "wheels")
    d = tmp_path / "specs"
    (d / "locks").mkdir(parents=True, exist_ok=True)
    (d / "locks" / f"{name}.txt").write_text(f"gpubake-probe==0.1.0 \\\n    --hash=sha256:{lock_hash or sha}\n")
    gpu = cuda != "none"
    (d / f"{name}.toml").write_text(SPEC.format(
        name=name, cuda=cuda, python=python, archs='["sm_90"]' if gpu else "[]", cpu_ok="false" if gpu else "true",
        torch="2.11.0" if gpu else "2.13.0"))
    return d / f"{name}.toml"


def fake_nvidia_smi(tmp_path: Path, version: str) -> Path:
    prog = tmp_path / "bin" / "nvidia-smi"
    prog.parent.mkdir(exist_ok=True)
    prog.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/nvidia-smi.args\necho {version}\necho {version}\n')
    prog.chmod(0o755)
    return prog


def host_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv on the host whose python sees this checkout's dependencies (and pip) via a .pth."""
    venv = tmp_path / "remote-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_checkout_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, site


@pytest.fixture
def host_images(sshd):
    """The host's per-image folder, removed afterwards (the host is this machine)."""
    root = sshd.home / ".gpubake" / "images"
    made: list[str] = []
    yield made
    for name in made:
        shutil.rmtree(root / name, ignore_errors=True)


def ssh_args(sshd) -> list[str]:
    return ["--key", str(sshd.key), "--port", str(sshd.port), "--known-hosts", str(sshd.known_hosts)]


def provision(cli, sshd, spec: Path, *extra: str) -> tuple[int, dict | None, str]:
    code, out, err = cli("remote", "provision", "root@127.0.0.1", *ssh_args(sshd), "--image", str(spec), *extra, "--json")
    return code, (json.loads(out) if out.strip().startswith("{") else None), err


def test_a_driver_below_the_image_minimum_is_refused_before_anything_is_installed(sshd, cli, tmp_path, host_images,
                                                                                tiny_nvfp4_checkpoint):
    host_images.append("oldhost")
    spec = make_spec(tmp_path, "oldhost", cuda="13.0")
    smi = fake_nvidia_smi(tmp_path, "550.54.15")
    venv = tmp_path / "never-made"
    code, _, err = provision(cli, sshd, spec, "--nvidia-smi", str(smi), "--weights", str(tiny_nvfp4_checkpoint),
                             "--venv", str(venv))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert "driver 550.54.15 is below 580.95.05, the minimum for image oldhost (CUDA 13.0); nothing installed" in lines[0]
    assert (tmp_path / "nvidia-smi.args").read_text().split() == ["--query-gpu=driver_version", "--format=csv,noheader"]
    assert not (sshd.home / ".gpubake" / "images" / "oldhost").exists() and not venv.exists()
    code, _, err = provision(cli, sshd, spec, "--nvidia-smi", str(tmp_path / "no" / "nvidia-smi"),
                             "--weights", str(tiny_nvfp4_checkpoint))
    assert code == 2 and "no nvidia-smi (no NVIDIA driver?); image oldhost needs driver >= 580.95.05" in err


def test_a_host_python_other_than_the_locks_is_refused(sshd, cli, tmp_path, host_images, tiny_nvfp4_checkpoint):
    host_images.append("py312img")
    other = "3.12" if PY != "3.12" else "3.11"
    spec = make_spec(tmp_path, "py312img", python=other)
    venv, _ = host_venv(tmp_path)
    code, _, err = provision(cli, sshd, spec, "--venv", str(venv), "--weights", str(tiny_nvfp4_checkpoint))
    assert code == 2 and f"is Python {PY}, but image py312img's lock is for Python {other}; nothing installed" in err
    assert not (sshd.home / ".gpubake" / "images" / "py312img").exists()


def test_provision_installs_the_lock_the_checkpoint_and_runs_the_selftest(sshd, cli, tmp_path, host_images,
                                                                          gpubake_wheel, tiny_nvfp4_checkpoint):
    import gpubake

    host_images.append("tinyimg")
    spec = make_spec(tmp_path, "tinyimg")
    venv, site = host_venv(tmp_path)
    report = tmp_path / "report.json"
    args = ["--venv", str(venv), "--wheel", str(gpubake_wheel), "--weights", str(tiny_nvfp4_checkpoint),
            "--pip-args", f"--no-index --find-links {tmp_path / 'wheels'}", "--report", str(report)]
    code, result, err = provision(cli, sshd, spec, *args)
    assert code == 0, err
    # the lock, hash-checked, then gpubake itself on top
    assert (site / "gpubake_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert list(site.glob("gpubake_probe-0.1.0.dist-info")) and list(site.glob("gpubake-*.dist-info"))
    assert "--require-hashes --no-deps --only-binary=:all:" in result["commands"]["lock"]
    assert result["version"] == f"gpubake {gpubake.__version__}" and result["python"] == PY
    host = sshd.home / ".gpubake" / "images" / "tinyimg"
    assert (host / "requirements.lock.txt").read_text() == (spec.parent / "locks" / "tinyimg.txt").read_text()
    assert (sshd.home / ".gpubake" / "dist" / gpubake_wheel.name).is_file()
    facts = json.loads((host / "image.json").read_text())
    assert facts["name"] == "tinyimg" and facts["min_driver"] is None and facts["target"] is None
    # the checkpoint, copied from the builder and checked on the host
    local_manifest = (tiny_nvfp4_checkpoint / "gpubake-manifest.json").read_bytes()
    assert (host / "model" / "gpubake-manifest.json").read_bytes() == local_manifest
    assert result["weights_action"] == "copied" and result["weights_sha256"] == hashlib.sha256(local_manifest).hexdigest()
    assert not (host / "model.partial").exists() and not (host / "model" / "SHA256SUMS").exists()
    # the self-test the host's gpubake ran, on that checkpoint, its report fetched back
    assert result["selftest"]["verdict"] == "pass"
    fetched = json.loads(report.read_text())
    assert fetched["image"] == "tinyimg" and {s["name"]: s["status"] for s in fetched["stages"]}["model"] == "pass"
    # again: the same checkpoint is kept, not copied twice
    code, again, err = provision(cli, sshd, spec, *args, "--no-selftest")
    assert code == 0 and again["weights_action"] == "kept" and "selftest" not in again, err


def test_a_lock_hash_that_does_not_match_stops_provision(sshd, cli, tmp_path, host_images, gpubake_wheel,
                                                         tiny_nvfp4_checkpoint):
    host_images.append("badhash")
    spec = make_spec(tmp_path, "badhash", lock_hash="0" * 64)
    venv, site = host_venv(tmp_path)
    code, _, err = provision(cli, sshd, spec, "--venv", str(venv), "--wheel", str(gpubake_wheel),
                             "--weights", str(tiny_nvfp4_checkpoint), "--pip-args",
                             f"--no-index --find-links {tmp_path / 'wheels'}")
    assert code == 2 and "pip install --require-hashes -r requirements.lock.txt failed" in err
    assert not list(site.glob("gpubake_probe*")) and not list(site.glob("gpubake-*.dist-info"))
    assert not (sshd.home / ".gpubake" / "images" / "badhash" / "model").exists()


@pytest.fixture
def checkpoint_server(tiny_nvfp4_checkpoint):
    handler = partial(SimpleHTTPRequestHandler, directory=str(tiny_nvfp4_checkpoint))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_gpu_host_fetches_the_checkpoint_from_the_store_verified(sshd, cli, tmp_path, host_images, gpubake_wheel,
                                                                   tiny_nvfp4_checkpoint, checkpoint_server):
    host_images.append("cudaimg")
    spec = make_spec(tmp_path, "cudaimg", cuda="13.0")
    smi = fake_nvidia_smi(tmp_path, "580.95.05")
    venv, _ = host_venv(tmp_path)
    sha = hashlib.sha256((tiny_nvfp4_checkpoint / "gpubake-manifest.json").read_bytes()).hexdigest()
    base = ["--venv", str(venv), "--wheel", str(gpubake_wheel), "--nvidia-smi", str(smi), "--no-selftest",
            "--pip-args", f"--no-index --find-links {tmp_path / 'wheels'}", "--weights", checkpoint_server]
    code, _, err = provision(cli, sshd, spec, *base, "--weights-sha256", "1" * 64)  # not the store's manifest
    assert code == 2 and "fetching the checkpoint failed" in err
    host = sshd.home / ".gpubake" / "images" / "cudaimg"
    assert not (host / "model").exists()
    code, result, err = provision(cli, sshd, spec, *base, "--weights-sha256", sha)
    assert code == 0, err
    assert result["driver"] == "580.95.05" and result["min_driver"] == "580.95.05" and result["weights_action"] == "fetched"
    assert hashlib.sha256((host / "model" / "gpubake-manifest.json").read_bytes()).hexdigest() == sha
    for rel in json.loads((host / "model" / "gpubake-manifest.json").read_text())["files"]:
        assert (host / "model" / rel).read_bytes() == (tiny_nvfp4_checkpoint / rel).read_bytes()


def test_provision_dry_run_lists_quoted_commands(cli, tmp_path):
    code, out, err = cli("remote", "provision", "me@gpu-box.example", "--image", "wan22-ti2v-5b", "--dry-run",
                         "--venv", "~/my env", "--weights", "s3://acme-weights/wan22-ti2v-5b", "--weights-sha256", "a" * 64,
                         "--pip-args", "--index-url https://pypi.example/simple", "--json")
    assert code == 0, err
    cmds = json.loads(out)["commands"]
    assert cmds["venv"] == "test -x \"$HOME\"/'my env/bin/python' || python3 -m venv \"$HOME\"/'my env'"
    assert cmds["lock"] == ("\"$HOME\"/'my env/bin/python' -m pip install --disable-pip-version-check -q --require-hashes "
                            "--no-deps --only-binary=:all: --index-url https://pypi.example/simple "
                            "-r \"$HOME\"/.gpubake/images/wan22-ti2v-5b/requirements.lock.txt")
    assert "--no-deps --force-reinstall" in cmds["gpubake"] and "[" not in cmds["gpubake"]  # no unpinned extras
    assert cmds["weights"].endswith(f"fetch s3://acme-weights/wan22-ti2v-5b \"$HOME\"/.gpubake/images/wan22-ti2v-5b/model "
                                    f"--sha256 {'a' * 64} --json")
    assert cmds["driver"] == "nvidia-smi --query-gpu=driver_version --format=csv,noheader"
    assert json.loads(out)["min_driver"] == "580.95.05"


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "s3://acme/wan"], "--weights-sha256: needed to verify s3://acme/wan"),
    (["--weights", "s3://acme/wan", "--weights-sha256", "xyz"], "--weights-sha256: not a sha256"),
    (["--weights", "ftp://acme/wan", "--weights-sha256", "a" * 64], "--weights: ftp://acme/wan: fetch from"),
    (["--weights", "/no/such/dir"], "--weights: no such directory"),
    ([], "--weights: the builder has no checkpoint of wan22-ti2v-5b cached"),
    (["--weights", "s3://a/b", "--weights-sha256", "a" * 64, "--pip-args", "--index-url 'x"], "--pip-args"),
])
def test_provision_bad_input_is_one_line(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = cli("remote", "provision", "me@gpu-box.example", "--image", "wan22-ti2v-5b", "--dry-run", *args)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in " ".join(err.split()), err
