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

`FakeApi.contract`, when set, validates every request a fake receives and every answer it
gives against the vendor's OpenAPI document (`tests/contracts/openapi_contract.py`): a
request the document refuses is answered as the vendor answers it (`reject`, and listed in
`refused`); an answer the document does not allow is a bug of the fake (listed in
`violations`, which the fixtures assert empty).
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
from dataclasses import dataclass, field, replace
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


@dataclass
class Fault:
    """One injected fault: the next `times` requests matching `method` and `path` answer `status`.

    `after=True` lets the request take effect first (the pod is created, the template saved)
    and only then answers `status`, or, with `delay`, answers late: the ambiguous create."""

    method: str
    path: str  # regex
    status: int
    delay: float = 0.0
    times: int = 1
    after: bool = False
    retry_after: str | None = None


class FakeApi:
    """A threaded HTTP server with a route table, a request log and fault injection."""

    prefix = ""
    # An object with check_request(method, path, query=, body=, headers=) and
    # check_response(method, path, status, body, content_type=), both raising AssertionError
    # (openapi_contract.ContractError) on a mismatch; None = unchecked.
    contract: Any = None

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.health: dict[str, list[dict[str, Any]]] = {}  # instance id -> reports to serve, in order
        self.refused: list[str] = []  # requests the vendor's document refuses (answered by reject())
        self.violations: list[str] = []  # answers of this fake that the document does not allow
        self.lock = threading.Lock()
        self.local = threading.local()
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

    def inject(self, method: str, path_regex: str, status: int, *, times: int = 1, delay: float = 0.0,
               after: bool = False, retry_after: str | None = None) -> None:
        """The next `times` matching requests answer `status` (after `delay` seconds); see `Fault`."""
        self.faults.append(Fault(method, path_regex, status, delay, times, after, retry_after))

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

    def authorize(self, method: str, path: str, header: str | None) -> int | None:
        """None when the Authorization header may make this request, else 401 or 403."""
        return None if header == f"Bearer {self.api_key}" else 401

    def error_body(self, status: int, detail: str) -> Any:
        """The body of an error answer (401, injected faults), in the vendor's format."""
        return {"error": detail}

    def content_type(self, status: int) -> str:
        return "application/json"

    def reject(self, errors: list[str]) -> tuple[int, Any]:
        """How the vendor answers a request its document refuses."""
        return 400, self.error_body(400, "; ".join(errors))

    # -------------------------------------------------------- plumbing
    def _fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for i, f in enumerate(self.faults):
                if f.method == method and re.search(f.path, path):
                    if f.times <= 1:
                        self.faults.pop(i)
                    else:
                        self.faults[i] = replace(f, times=f.times - 1)
                    return f
        return None

    def _check_request(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
                       body: Any) -> list[str]:
        """Why the vendor's document refuses this request (empty: it conforms, or nothing checks)."""
        if self.contract is None or self.public(path):
            return []
        args = {"query": {k: v[-1] for k, v in query.items()} or None, "body": body, "headers": headers}
        if hasattr(self.contract, "request_errors"):  # openapi_contract.Contract: the list itself
            return list(self.contract.request_errors(method, path, **args))
        try:
            self.contract.check_request(method, path, **args)
        except AssertionError as exc:
            return [str(exc)]
        return []

    def _check_response(self, method: str, path: str, status: int, payload: Any, content_type: str) -> None:
        if self.contract is None or self.public(path):
            return
        try:
            self.contract.check_response(method, path, status, payload, content_type=content_type)
        except AssertionError as exc:
            self.violations.append(str(exc))

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
                path, method = parts.path, self.command
                api.requests.append(Recorded(method, path, query, dict(self.headers), body))
                fault = api._fault(method, path)
                if fault and not fault.after:
                    time.sleep(fault.delay)
                    return self._fault_answer(method, path, fault)
                api.local.headers = dict(self.headers)  # for routes that read a header (the instance's /health)
                denied = None if api.public(path) else api.authorize(method, path, self.headers.get("Authorization"))
                if denied:
                    detail = "Unauthorized: invalid API key" if denied == 401 else "Forbidden: the key lacks this permission"
                    return self._send(method, path, denied, api.error_body(denied, detail))
                refused = api._check_request(method, path, query, dict(self.headers), body)
                if refused:
                    api.refused.append(f"{method} {path}: " + "; ".join(refused))
                    return self._send(method, path, *api.reject(refused))
                answer = api.route(method, path, query, body)
                if fault:  # the request took effect; now the answer is lost or late
                    time.sleep(fault.delay)
                    if fault.status < 400:
                        return self._send(method, path, *answer)
                    return self._fault_answer(method, path, fault)
                self._send(method, path, *answer)

            def _fault_answer(self, method: str, path: str, fault: Fault) -> None:
                retry = fault.retry_after if fault.retry_after is not None else ("0" if fault.status in (429, 503) else None)
                extra = {"Retry-After": retry} if retry is not None else {}
                self._send(method, path, fault.status, api.error_body(fault.status, f"injected {fault.status}"), extra)

            def _send(self, method: str, path: str, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                ctype = api.content_type(status)
                api._check_response(method, path, status, payload, ctype)
                try:
                    self.send_response(status)
                    if payload is not None:
                        self.send_header("Content-Type", ctype)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a read timeout)
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

        return Handler


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
