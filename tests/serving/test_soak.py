"""A bounded soak: `gpubake serve` in its own process on loopback (tiny model, CPU, API
key), 200 requests of valid and invalid kinds, the process SIGKILLed in the middle of a
job and started again on the same data dir. No 5xx, every error `{"error"}`, and every
accepted job is found afterwards: done, or failed because the process died under it."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

KEY = "soak-key-" + "s" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}
TOTAL = 200
KILL_AT = 100
INTERRUPTED = "the service stopped while this job was running"


class Server:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp, self.model_dir = tmp, model_dir
        self.data = tmp / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Any = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        if self.log is not None:
            self.log.close()
        log = self.log = open(self.tmp / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "GPUBAKE_API_KEY": KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpubake", "serve", "--image", "demo", "--model-dir", str(self.model_dir),
             "--report", str(self.tmp / "selftest.json"), "--data-dir", str(self.data), "--no-selftest",
             "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port), "--max-queue", "48",
             "--max-pixel-frames", str(64 * 64 * 5)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if requests.get(self.url + "/health", timeout=5).json()["status"] == "ready":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError("service did not become ready\n" + self.log_tail())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()

    def log_tail(self) -> str:
        path = self.tmp / f"serve-{self.starts}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _request(rng: random.Random, accepted: list[str]) -> tuple[str, str, dict[str, Any]]:
    """One request of a random kind: (method, path, requests kwargs)."""
    kind = rng.choices(["valid", "invalid", "status", "video", "health", "nokey", "unknown"],
                       weights=[15, 30, 20, 10, 8, 9, 8])[0]
    if kind == "valid":
        # small clips: the soak is about the service, not the renders (~0.3 s each on 2 cores)
        size = f"{rng.choice([16, 32])}x{rng.choice([16, 32])}"
        body = {"prompt": f"soak {rng.random():.6f}", "size": size, "frames": 1, "steps": 1,
                "seed": rng.randrange(2**32)}
        return "POST", "/v1/generate", {"json": body, "headers": AUTH}
    if kind == "invalid":
        bad = rng.choice([
            {"json": {}}, {"json": {"prompt": "x", "frames": 6}}, {"json": {"prompt": "x", "frames": True}},
            {"json": {"prompt": "x", "steps": 1.5}}, {"json": {"prompt": "x", "colour": "red"}},
            {"json": {"prompt": "x", "size": "100x100"}}, {"json": {"prompt": "x", "size": "1024x1024"}},
            {"json": {"prompt": "x", "steps": 101}}, {"data": "{nope", "headers": {"content-type": "application/json"}},
            {"data": b"\xc3\x28", "headers": {"content-type": "application/json"}},
            {"json": {"prompt": "y" * 70_000}}, {"json": ["prompt"]},
        ])
        bad["headers"] = {**AUTH, **bad.get("headers", {})}
        return "POST", "/v1/generate", bad
    if kind in ("status", "video") and accepted:
        jid = rng.choice(accepted)
        return "GET", f"/v1/jobs/{jid}" + ("/video" if kind == "video" else ""), {"headers": AUTH}
    if kind == "health":
        return "GET", "/health", {"headers": rng.choice([AUTH, {}])}
    if kind == "nokey":
        return rng.choice(["GET", "POST"]), rng.choice(["/v1/info", "/v1/generate", "/openapi.json"]), {
            "json": {"prompt": "free ride"}, "headers": rng.choice([{}, {"Authorization": "Bearer wrong-0123456789"}])}
    return "GET", rng.choice(["/v1/jobs/0123456789abcdef", "/v1/nothing", "/v1/jobs/a%0Ab"]), {"headers": AUTH}


def _check(r: requests.Response) -> None:
    assert r.status_code < 500, f"{r.status_code} {r.request.method} {r.request.path_url}: {r.text[:300]}"
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body.get("error"), str) and "\n" not in body["error"], body


@pytest.mark.slow
def test_soak_with_a_restart(tiny_nvfp4_checkpoint: Path, tmp_path: Path):
    rng = random.Random(13)
    server = Server(tmp_path, tiny_nvfp4_checkpoint)
    accepted: list[str] = []
    statuses: Counter[int] = Counter()
    killed_running: list[str] = []
    server.start()
    try:
        for i in range(TOTAL):
            if i == KILL_AT:
                # a long job (the most work the limits allow), killed while it renders
                jid = requests.post(server.url + "/v1/generate", headers=AUTH, timeout=30, json={
                    "prompt": "cut off", "size": "64x64", "frames": 5, "steps": 8}).json()["id"]
                accepted.append(jid)
                deadline = time.monotonic() + 120
                status_url = f"{server.url}/v1/jobs/{jid}"
                while requests.get(status_url, headers=AUTH, timeout=30).json()["status"] != "running":
                    assert time.monotonic() < deadline, "the long job never started"
                    time.sleep(0.01)
                server.kill()
                killed_running.append(jid)
                server.start()
            method, path, kw = _request(rng, accepted)
            r = requests.request(method, server.url + path, timeout=30, **kw)
            statuses[r.status_code] += 1
            _check(r)
            if r.status_code == 202:
                accepted.append(r.json()["id"])
        # every accepted job: finished (or cut off by the kill), and in the table
        deadline = time.monotonic() + 240
        final: dict[str, dict[str, Any]] = {}
        for jid in accepted:
            while True:
                r = requests.get(f"{server.url}/v1/jobs/{jid}", headers=AUTH, timeout=30)
                assert r.status_code == 200, f"job {jid} lost: {r.status_code} {r.text}"
                if r.json()["status"] in ("done", "failed"):
                    final[jid] = r.json()
                    break
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.05)
    finally:
        server.stop()
    failed = {j: b for j, b in final.items() if b["status"] == "failed"}
    assert list(failed) == killed_running, {j: b.get("error") for j, b in failed.items()}
    assert failed[killed_running[0]]["error"].startswith(INTERRUPTED)
    done = [j for j, b in final.items() if b["status"] == "done"]
    assert len(done) == len(accepted) - 1 and len(accepted) > 15
    with sqlite3.connect(server.data / "jobs.sqlite3") as db:
        rows = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert set(accepted) <= set(rows)
    assert all((server.data / "jobs" / j / "video.mp4").is_file() for j in done)
    assert not any(code >= 500 for code in statuses), statuses
    assert {202, 401, 404, 422}.issubset(statuses), statuses  # the mix really was mixed
    assert server.starts == 2
    # the second start trusted the first one's hashes (sizes checked, nothing re-read)
    cache = json.loads((server.data / "model-hashes.json").read_text())
    assert len(cache["files"]) > 5
