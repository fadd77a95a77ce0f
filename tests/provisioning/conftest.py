"""Real local servers for the fetch tests, started and stopped by the fixtures.

- `http_server`: a threaded http.server serving a directory with Range support and
  fault knobs: cut a response after N body bytes, flip a byte of a file.
- `moto_s3`: moto's S3 server (ThreadedMotoServer) on 127.0.0.1, a bucket, and the
  AWS_* environment pointing at it.
- `small_fs`: a tmpfs of a few hundred KiB, to fill the disk mid-write.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest




@dataclass
class Faults:
    cut_after: int | None = None  # close the connection after this many body bytes...
    cut_times: int = 0  # ...for this many responses (then serve normally)
    die_at: int | None = None  # every response stops at this absolute file offset
    flip: set[str] = field(default_factory=set)  # relpaths served with one byte flipped
    ignore_range: bool = False
    status: int | None = None  # answer every request with this status
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        faults: Faults = self.server.faults  # type: ignore[attr-defined]
        root: Path = self.server.root  # type: ignore[attr-defined]
        rel = self.path.split("?", 1)[0].lstrip("/")
        from urllib.parse import unquote

        rel = unquote(rel)
        rng = self.headers.get("Range")
        faults.requests.append((rel, rng))
        if faults.status:
            self.send_response(faults.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = root / rel
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = bytearray(path.read_bytes())
        if rel in faults.flip and data:
            data[len(data) // 2] ^= 0xFF
        start = 0
        if rng and not faults.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = bytes(data[start:])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = None
        if faults.cut_after is not None and faults.cut_times > 0 and len(body) > faults.cut_after:
            faults.cut_times -= 1
            cut = faults.cut_after
        if faults.die_at is not None and start + len(body) > faults.die_at:
            cut = max(0, faults.die_at - start)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@dataclass
class HttpServer:
    root: Path
    url: str
    faults: Faults


@pytest.fixture
def http_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.root = root  # type: ignore[attr-defined]
    srv.faults = Faults()  # type: ignore[attr-defined]
    srv.handle_error = lambda *a: None  # type: ignore[method-assign]  # resets by the client are expected
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield HttpServer(root, f"http://127.0.0.1:{srv.server_address[1]}/", srv.faults)  # type: ignore[attr-defined]
    finally:
        srv.shutdown()
        srv.server_close()




@pytest.fixture
def small_fs(tmp_path: Path):
    """A 384 KiB tmpfs (needs root and mount(2); skipped where the sandbox forbids it)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------- fake Hub
LFS_SUFFIXES = (".safetensors", ".bin")


class _HubHandler(SimpleHTTPRequestHandler):
    """The few Hub endpoints huggingface_hub's snapshot_download uses: revision info,
    recursive tree listing (with LFS sha256), and resolve (HEAD and GET)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        import hashlib
        import json as _json
        from urllib.parse import unquote, urlsplit

        hub = self.server.hub  # type: ignore[attr-defined]
        hub.auth.append(self.headers.get("Authorization"))
        path = unquote(urlsplit(self.path).path)
        roots = {hub.repo: hub.root, **hub.repos}
        repo = next((r for r in roots if path.startswith((f"/api/models/{r}/", f"/{r}/resolve/"))), hub.repo)
        root = roots[repo]
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        if path.startswith(f"/api/models/{repo}/revision/"):
            body = {"id": repo, "modelId": repo, "sha": hub.commit, "siblings": [{"rfilename": f} for f in files]}
            return self._send(200, _json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if path.startswith(f"/api/models/{repo}/tree/"):
            entries = []
            for rel, p in files.items():
                data = p.read_bytes()
                oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                e: dict[str, Any] = {"type": "file", "path": rel, "size": len(data), "oid": oid}
                if rel.endswith(LFS_SUFFIXES):
                    e["lfs"] = {"oid": hub.lfs_sha.get(rel) or hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._send(200, _json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        prefix = f"/{repo}/resolve/"
        if path.startswith(prefix):
            rel = path[len(prefix):].split("/", 1)[1]
            if rel not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = files[rel].read_bytes()
            etag = hashlib.sha256(data).hexdigest() if rel.endswith(LFS_SUFFIXES) else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            if rel in hub.flip and data:
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            hdrs = {"X-Repo-Commit": hub.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if rel.endswith(LFS_SUFFIXES):
                hdrs["X-Linked-Etag"] = f'"{etag}"'
                hdrs["X-Linked-Size"] = str(len(data))
            return self._send(200, data, hdrs, head)
        return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)

    def do_GET(self) -> None:  # noqa: N802
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)


@dataclass
class FakeHub:
    root: Path
    endpoint: str
    repo: str = "Wan-AI/Tiny-Diffusers"
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    repos: dict[str, Path] = field(default_factory=dict)  # more repositories served: {org/name: folder}
    flip: set[str] = field(default_factory=set)
    lfs_sha: dict[str, str] = field(default_factory=dict)
    auth: list[str | None] = field(default_factory=list)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "hubrepo"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    srv.daemon_threads = True
    srv.handle_error = lambda *a: None  # type: ignore[method-assign]
    hub = FakeHub(root, f"http://127.0.0.1:{srv.server_address[1]}")
    srv.hub = hub  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    try:
        yield hub
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """The tiny checkpoint's diffusers pipeline on the CPU, one per test module (a module's
    tests may change its scheduler or hooks; the next module gets a fresh one)."""
    from gpubake.provisioning.loader import load_pipeline

    p = load_pipeline(tiny_checkpoint, "cpu")
    p.set_progress_bar_config(disable=True)
    return p


class ExpertForwards:
    """Each expert forward of a pipeline: `calls` (expert, timestep), `contexts` (the text
    context's identity: the prompt's or the negative prompt's) and `outputs` (its result)."""

    def __init__(self, pipe) -> None:
        import torch

        self.calls: list[tuple[str, float]] = []
        self.contexts: list[int] = []
        self.outputs: list[torch.Tensor] = []
        self.handles = []
        for name in ("transformer", "transformer_2"):
            module = getattr(pipe, name)
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(
                lambda m, a, kw, out: self.outputs.append(out[0].detach().float().clone()), with_kwargs=True))

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self.calls.append((name, float(kwargs["timestep"][0])))
            self.contexts.append(id(kwargs["encoder_hidden_states"]))
        return hook

    def experts(self) -> list[str]:
        return [n for n, _ in self.calls]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture
def forwards(pipe):
    f = ExpertForwards(pipe)
    yield f
    f.close()
