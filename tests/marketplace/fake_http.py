"""The plumbing every marketplace fake shares: a threaded HTTP server on 127.0.0.1, the log
of what it received, injected faults, and the rented machine's `/health` reports.

`LoopbackServer` parses and records each request and sends what its `handle` returns; a
fake decides the answer (and in which order it checks key, contract and faults, which is
the vendor's own). `FakeApi` is such a fake with a route table and overridable hooks
(`fake_runpod.FakeRunPod` builds on it); `fake_vastai.FakeVast` orders its checks as Vast.ai
does and builds on `LoopbackServer` directly.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from testutil import free_port

JSON = "application/json"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Fault:
    """One injected fault: the next `times` requests matching `method` and `path` answer `status`.

    `after=True` lets the request take effect first (the pod is created, the template saved)
    and only then answers `status`, or, with `delay`, answers late: the ambiguous create.
    `status` None (where a fake allows it): the real answer, `delay` seconds late."""

    method: str
    path: str  # regex
    status: int | None
    delay: float = 0.0
    times: int = 1
    after: bool = False
    retry_after: str | None = None


class LoopbackServer:
    """A threaded HTTP server on a free loopback port: request log, faults, /health reports."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.health: dict[str, list[dict[str, Any]]] = {}  # instance id -> reports to serve, in order
        self.violations: list[str] = []  # what the vendor's document does not allow (the fixtures assert none)
        self.lock = threading.RLock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -------------------------------------------------------- control
    def start(self):  # -> the fake itself (its own type)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

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

    # -------------------------------------------------------- for the fakes
    def take_fault(self, method: str, path: str) -> Fault | None:
        """The first injected fault matching this request, counted down (gone after its last use)."""
        with self.lock:
            for i, f in enumerate(self.faults):
                if f.method == method and re.search(f.path, path):
                    if f.times <= 1:
                        self.faults.pop(i)
                    else:
                        self.faults[i] = replace(f, times=f.times - 1)
                    return f
        return None

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str], str]:
        """(status, JSON payload or None, extra headers, content type) of the answer."""
        raise NotImplementedError

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

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
                server.requests.append(Recorded(self.command, parts.path, query, dict(self.headers), body))
                status, payload, extra, ctype = server.handle(self.command, parts.path, query, dict(self.headers), body)
                data = b"" if payload is None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    if payload is not None:
                        self.send_header("Content-Type", ctype)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a read timeout)
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

        return Handler


class FakeApi(LoopbackServer):
    """A fake with a route table and hooks: fault, then key, then the vendor's document, then the route."""

    prefix = ""
    # An object with check_request(method, path, query=, body=, headers=) and
    # check_response(method, path, status, body, content_type=), both raising AssertionError
    # (openapi_contract.ContractError) on a mismatch; None = unchecked.
    contract: Any = None

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self.refused: list[str] = []  # requests the vendor's document refuses (answered by reject())
        self.local = threading.local()

    def inject(self, method: str, path_regex: str, status: int, *, times: int = 1, delay: float = 0.0,
               after: bool = False, retry_after: str | None = None) -> None:
        """The next `times` matching requests answer `status` (after `delay` seconds); see `Fault`."""
        self.faults.append(Fault(method, path_regex, status, delay, times, after, retry_after))

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
        return JSON

    def reject(self, errors: list[str]) -> tuple[int, Any]:
        """How the vendor answers a request its document refuses."""
        return 400, self.error_body(400, "; ".join(errors))

    # -------------------------------------------------------- plumbing
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

    def _fault_answer(self, fault: Fault) -> tuple[int, Any, dict[str, str]]:
        retry = fault.retry_after if fault.retry_after is not None else ("0" if fault.status in (429, 503) else None)
        extra = {"Retry-After": retry} if retry is not None else {}
        return fault.status, self.error_body(fault.status, f"injected {fault.status}"), extra

    def _answer(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
                body: Any) -> tuple[int, Any, dict[str, str]]:
        fault = self.take_fault(method, path)
        if fault and not fault.after:
            time.sleep(fault.delay)
            return self._fault_answer(fault)
        self.local.headers = headers  # for routes that read a header (the instance's /health)
        denied = None if self.public(path) else self.authorize(method, path, headers.get("Authorization"))
        if denied:
            detail = "Unauthorized: invalid API key" if denied == 401 else "Forbidden: the key lacks this permission"
            return denied, self.error_body(denied, detail), {}
        refused = self._check_request(method, path, query, headers, body)
        if refused:
            self.refused.append(f"{method} {path}: " + "; ".join(refused))
            return (*self.reject(refused), {})
        answer = self.route(method, path, query, body)
        status, payload, extra = (*answer, {}) if len(answer) == 2 else answer
        if fault:  # the request took effect; now the answer is lost or late
            time.sleep(fault.delay)
            if fault.status >= 400:
                return self._fault_answer(fault)
        return status, payload, extra

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str], str]:
        status, payload, extra = self._answer(method, path, query, headers, body)
        ctype = self.content_type(status)
        self._check_response(method, path, status, payload, ctype)
        return status, payload, extra, ctype
