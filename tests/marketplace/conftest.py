"""Local stand-ins for the RunPod and Vast.ai APIs, an sshd, and a GPU image spec.

The marketplaces cannot be reached from CI, so the contract tests run the real clients
against servers on 127.0.0.1 that implement the documented endpoints and response shapes:

- RunPod REST v2: `FakeRunPod` in `fake_runpod.py` (templates, pods, serverless endpoints,
  the GPU catalog), checked against the vendored OpenAPI document.
- Vast.ai: `FakeVast` and the `vast` fixture in `fake_vastai.py`, every request and answer
  validated against the vendor's OpenAPI document.

Both also serve the rented machine's `GET /health` (the self-test report of
`gpubake.smoke_tests.report`): RunPod through a stand-in of its HTTP proxy
(`/proxy/{pod}/{port}/health`, `GPUBAKE_RUNPOD_PROXY_URL`), Vast.ai on the host port that
`GET /instances/{id}/` publishes. Faults (401, 404, 429 with Retry-After, 5xx, slow answers,
and a 5xx or a timeout *after* the action succeeded) are injected per request with
`server.inject(...)`.

The server, request log and fault injection both fakes use are `fake_http.py`'s
(`LoopbackServer`, and `FakeApi` on it). `FakeApi.contract`, when set, validates every request a fake receives and every answer it
gives against the vendor's OpenAPI document (`tests/contracts/openapi_contract.py`): a
request the document refuses is answered as the vendor answers it (`reject`, and listed in
`refused`); an answer the document does not allow is a bug of the fake (listed in
`violations`, which the fixtures assert empty).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from testutil import free_port, stop_process

from marketplace.fake_http import FakeApi, Fault, Recorded  # noqa: F401  (the fakes' shared plumbing)
from marketplace.fake_vastai import FakeVast, vast  # noqa: F401  (Vast.ai's stand-in and fixture)

REGISTRY_PASSWORD = "ghp_REGISTRYSECRET_55aa66bb"


def report(verdict: str | None, *, step_s: float = 1.5) -> dict[str, Any]:
    """A `GET /health` body as gpubake's service answers it (provisioning/serving/service.py
    `health()`), wrapping a self-test report as `smoke_tests.report.Report.to_dict()` writes it."""
    from gpubake.smoke_tests.report import Report, StageResult

    throughput = {None: "pass", "pass": "pass", "degraded": "warn", "fail": "fail"}[verdict]
    stages = [
        StageResult("gpu", "pass", "NVIDIA L40S", {}, 0.1, 30),
        StageResult("throughput", throughput, "within tolerance",
                    {"seconds_per_step": step_s, "end_to_end_seconds": 12.0}, 20.0, 600),
    ]
    rep = Report(image="gpuimg", model_id="tiny-wan2.2", options={}, stages=stages if verdict else stages[:1])
    if verdict is not None:
        rep.finish()  # the verdict follows from the stages, as in a real run
        assert rep.verdict == verdict
    phase = {None: "selftest", "fail": "failed"}.get(verdict, "ready")
    return {"status": phase, "ready": phase == "ready", "verdict": verdict, "reason": None, "model_id": "tiny-wan2.2",
            "queue": {"waiting": 0, "capacity": 4}, "selftest": rep.to_dict()}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real config, keys or registry credentials leak into a test; retries back off fast."""
    for name in ("RUNPOD_API_KEY", "VAST_API_KEY", "GPUBAKE_REGISTRY_USER", "GPUBAKE_REGISTRY_PASSWORD",
                 "GPUBAKE_RUNPOD_API_URL", "GPUBAKE_VAST_API_URL", "GPUBAKE_RUNPOD_PROXY_URL", "GPUBAKE_API_KEY",
                 "GPUBAKE_HTTP_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUBAKE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("GPUBAKE_HTTP_BACKOFF", "0.01")


# ---------------------------------------------------------------- a GPU image spec

GPU_SPEC = """\
schema_version = 1
name = "gpuimg"
description = "Test image for Ada and Hopper"
targets = ["runpod", "vastai"]
gpu_archs = ["sm_89", "sm_90"]
cuda = "12.8"
torch = "2.11.0"

[base.bootstrap]
suite = "bookworm"
packages = ["python3"]

[python]
version = "3.11"
lock = "locks/gpuimg.txt"

[model]
id = "tiny-wan2.2"
quantization = "nvfp4"
source = "generate:tiny"

[runtime]
ports = [{ port = 8000, protocol = "http", name = "api" }, { port = 22, protocol = "tcp", name = "ssh" }]
env = { GPUBAKE_MODEL_DIR = "/opt/gpubake/model", GPUBAKE_IMAGE = "gpuimg" }
entrypoint = ["/opt/gpubake/start.sh"]
container_disk_gb = 40
volume_disk_gb = 0
volume_mount = "/workspace"
"""


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    """A valid GPU image spec file (sm_89/sm_90, CUDA 12.8) outside the catalog."""
    d = tmp_path / "specs"
    (d / "locks").mkdir(parents=True)
    (d / "locks" / "gpuimg.txt").write_text("requests==2.32.3 --hash=sha256:" + "0" * 64 + "\n")
    path = d / "gpuimg.toml"
    path.write_text(GPU_SPEC)
    return path


@pytest.fixture
def spec(spec_path: Path):
    from gpubake.images.spec import load_spec

    return load_spec(spec_path)


IMAGE_REF = "ghcr.io/acme/gpuimg@sha256:" + "ab" * 32


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `gpubake ARGS...` in-process: (exit code, stdout, stderr)."""
    from gpubake.cli import _run

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = _run([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# ---------------------------------------------------------------- sshd on loopback


@dataclass
class Sshd:
    port: int
    key: Path  # client private key authorised for root
    known_hosts: Path  # a known_hosts file holding this sshd's host key
    home: Path  # the remote user's home (root's)
    proc: subprocess.Popen = field(repr=False)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real OpenSSH server on 127.0.0.1 with its own host key and one authorised client key."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary) or not shutil.which("ssh-keygen"):
        pytest.skip("sshd/ssh-keygen not installed (scripts/setup.sh installs openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("sshd tests run sshd as root (privilege separation needs it)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd did not start: {proc.stderr.read().decode(errors='replace')[-300:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    try:
        yield Sshd(port, d / "client_key", d / "known_hosts", Path(os.path.expanduser("~root")), proc)
    finally:
        stop_process(proc, timeout=5)


@pytest.fixture
def image_ref() -> str:
    return IMAGE_REF


@pytest.fixture
def make_report() -> Callable[..., dict[str, Any]]:
    return report


from marketplace.fake_runpod import FakeRunPod, runpod  # noqa: E402,F401  (the RunPod REST v2 fake and its fixture)
