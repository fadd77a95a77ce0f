"""Local stand-ins for the RunPod and Vast.ai APIs, an sshd, and a GPU image spec.

The marketplaces cannot be reached from CI, so the contract tests run the real clients
against servers on 127.0.0.1 that implement the documented endpoints and response shapes:

- RunPod REST v1 (https://docs.runpod.io/api-reference): `GET/POST /v1/templates`,
  `PATCH /v1/templates/{id}`, `POST /v1/pods`, `GET/DELETE /v1/pods/{id}`; bearer key;
  template names unique (POST of an existing name is a 400, as the docs say).
- Vast.ai: `FakeVast` and the `vast` fixture in `fake_vastai.py`, every request and answer
  validated against the vendor's OpenAPI document.

Both also serve the rented machine's `GET /health` (the self-test report of
`gpubake.smoke_tests.report`): RunPod through a stand-in of its HTTP proxy
(`/proxy/{pod}/{port}/health`, `GPUBAKE_RUNPOD_PROXY_URL`), Vast.ai on the host port that
`GET /instances/{id}/` publishes. Faults (401, 404, 429, 5xx, slow answers) are injected per
request with `server.inject(...)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from testutil import free_port, stop_process

from marketplace.fake_vastai import FakeVast, vast  # noqa: F401  (Vast.ai's stand-in and fixture)

RUNPOD_KEY = "rpa_TESTKEY_7f3a9c1e5b2d4f60"
REGISTRY_PASSWORD = "ghp_REGISTRYSECRET_55aa66bb"




@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


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


class FakeApi:
    """A threaded HTTP server with a route table, a request log and fault injection."""

    prefix = ""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.faults: list[tuple[str, str, int, float, int]] = []  # method, path regex, status, delay, times
        self.health: dict[str, list[dict[str, Any]]] = {}  # instance id -> reports to serve, in order
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -------------------------------------------------------- control
    def start(self) -> FakeApi:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, method: str, path_regex: str, status: int, *, times: int = 1, delay: float = 0.0) -> None:
        """The next `times` matching requests answer `status` (after `delay` seconds)."""
        self.faults.append((method, path_regex, status, delay, times))

    def calls(self, method: str | None = None, path_regex: str = "") -> list[Recorded]:
        return [r for r in self.requests if (method is None or r.method == method) and re.search(path_regex, r.path)]

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE") and "/bundles/" not in r.path]

    def set_health(self, instance_id: str, *reports: dict[str, Any]) -> None:
        """Serve these reports at the instance's /health, one per poll, the last one forever."""
        self.health[instance_id] = list(reports)

    def next_health(self, instance_id: str) -> dict[str, Any] | None:
        with self.lock:
            queue = self.health.get(instance_id)
            if not queue:
                return None
            return queue.pop(0) if len(queue) > 1 else queue[0]

    # -------------------------------------------------------- to override
    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def public(self, path: str) -> bool:
        """Paths served without the API key (the rented machine's own endpoints)."""
        return False

    # -------------------------------------------------------- plumbing
    def _fault(self, method: str, path: str) -> tuple[int, float] | None:
        with self.lock:
            for i, (m, rx, status, delay, times) in enumerate(self.faults):
                if m == method and re.search(rx, path):
                    if times <= 1:
                        self.faults.pop(i)
                    else:
                        self.faults[i] = (m, rx, status, delay, times - 1)
                    return status, delay
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _do(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("latin-1")
                query = parse_qs(parts.query)
                api.requests.append(Recorded(self.command, parts.path, query, dict(self.headers), body))
                fault = api._fault(self.command, parts.path)
                if fault:
                    status, delay = fault
                    time.sleep(delay)
                    extra = {"Retry-After": "0"} if status in (429, 503) else {}
                    return self._send(status, {"error": f"injected {status}"}, extra)
                if not api.public(parts.path):
                    if self.headers.get("Authorization") != f"Bearer {api.api_key}":
                        return self._send(401, {"error": "Unauthorized: invalid API key"})
                status, payload = api.route(self.command, parts.path, query, body)
                self._send(status, payload)

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

        return Handler


class FakeRunPod(FakeApi):
    """RunPod REST v1 as documented at https://docs.runpod.io/api-reference (templates, pods)."""

    def __init__(self, api_key: str = RUNPOD_KEY) -> None:
        super().__init__(api_key)
        self.templates: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.cost_per_hr = "0.79"
        self.ssh_port = 40022  # host port RunPod maps the pod's port 22 to
        self._n = 0

    def public(self, path: str) -> bool:
        return path.startswith("/proxy/")

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}x"

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        m = re.fullmatch(r"/proxy/([^/]+)/(\d+)/health", path)
        if m and method == "GET":
            rep = self.next_health(m.group(1))
            if m.group(1) not in self.pods or rep is None:
                return 502, {"error": "pod not ready"}  # what RunPod's proxy answers before the port listens
            return (200 if rep.get("ready", True) else 503), rep
        if path == "/v1/templates" and method == "GET":
            return 200, list(self.templates.values())
        if path == "/v1/templates" and method == "POST":
            if not body.get("name") or not body.get("imageName"):
                return 400, {"error": "name and imageName are required"}
            if any(t["name"] == body["name"] for t in self.templates.values()):
                return 400, {"error": "Template name must be unique"}
            tid = self._id("tpl")
            self.templates[tid] = {"id": tid, "isRunpod": False, **body}
            return 200, self.templates[tid]
        m = re.fullmatch(r"/v1/templates/([^/]+)", path)
        if m and method == "PATCH":
            if m.group(1) not in self.templates:
                return 404, {"error": "template not found"}
            self.templates[m.group(1)].update(body)
            return 200, self.templates[m.group(1)]
        if path == "/v1/pods" and method == "POST":
            tpl = self.templates.get(body.get("templateId", ""))
            if tpl is None and not body.get("imageName"):
                return 400, {"error": "imageName or a valid templateId is required"}
            pid = self._id("pod")
            self.pods[pid] = {
                "id": pid, "name": body.get("name"), "desiredStatus": "RUNNING", "costPerHr": self.cost_per_hr,
                "imageName": body.get("imageName"), "publicIp": "127.0.0.1", "portMappings": {"22": self.ssh_port},
                "gpu": {"id": body["gpuTypeIds"][0], "count": 1}, "request": body,
            }
            return 201, {k: v for k, v in self.pods[pid].items() if k != "request"}
        m = re.fullmatch(r"/v1/pods/([^/]+)", path)
        if m and method == "GET":
            pod = self.pods.get(m.group(1))
            return (200, {k: v for k, v in pod.items() if k != "request"}) if pod else (404, {"error": "pod not found"})
        if m and method == "DELETE":
            if self.pods.pop(m.group(1), None) is None:
                return 404, {"error": "pod not found"}
            return 204, None
        return 404, {"error": f"no route {method} {path}"}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real config, keys or registry credentials leak into a test; retries back off fast."""
    for name in ("RUNPOD_API_KEY", "VAST_API_KEY", "GPUBAKE_REGISTRY_USER", "GPUBAKE_REGISTRY_PASSWORD",
                 "GPUBAKE_RUNPOD_API_URL", "GPUBAKE_VAST_API_URL", "GPUBAKE_RUNPOD_PROXY_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUBAKE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("GPUBAKE_HTTP_BACKOFF", "0.01")


@pytest.fixture
def runpod(monkeypatch: pytest.MonkeyPatch):
    server = FakeRunPod().start()
    monkeypatch.setenv("RUNPOD_API_KEY", RUNPOD_KEY)
    monkeypatch.setenv("GPUBAKE_RUNPOD_API_URL", server.url + "/v1")
    monkeypatch.setenv("GPUBAKE_RUNPOD_PROXY_URL", server.url + "/proxy/{pod_id}/{port}")
    try:
        yield server
    finally:
        server.stop()


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
