"""Serve the real app with uvicorn on a free loopback port, in a thread, per test module."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests


class Served:
    """The running app; with `key`, every request carries `Authorization: Bearer <key>`
    unless the call passes its own headers."""

    def __init__(self, url: str, service: Any, key: str | None = None) -> None:
        self.url = url
        self.service = service
        self.key = key

    def _headers(self, kw: dict[str, Any]) -> dict[str, Any]:
        if self.key and "headers" not in kw:
            kw["headers"] = {"Authorization": f"Bearer {self.key}"}
        return kw

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **self._headers(kw))

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **self._headers(kw))

    def wait_phase(self, *phases: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get("/health").json()
            if body["status"] in phases:
                return body
            time.sleep(0.05)
        raise AssertionError(f"service never reached {phases}: {body}")

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get(f"/v1/jobs/{job_id}").json()
            if body["status"] in ("done", "failed"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never finished: {body}")


def _hold_generator(service: Any) -> tuple[threading.Event, threading.Event]:
    """Make the service's next job block inside its render: returns (gate, started); the job
    sets `started` on entering and renders once `gate` is set (30 s at most)."""
    gate, started = threading.Event(), threading.Event()
    real_run = service.generator.run

    def held(args: Any, out_dir: Path) -> Any:
        started.set()
        gate.wait(30)
        return real_run(args, out_dir)

    service.generator.run = held
    return gate, started


@contextmanager
def serve(service: Any, api_key: str | None = None) -> Iterator[Served]:
    import uvicorn

    from gpubake.provisioning.serving.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=api_key), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", service, api_key)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def make_service(tmp_path_factory: pytest.TempPathFactory, tiny_nvfp4_checkpoint: Path) -> Callable[..., Any]:
    """make_service(image="demo", **build_service kwargs) -> a GenerationService on the tiny model,
    given the image's facts as build-image writes them into image.json."""
    from gpubake.images.catalog import find
    from gpubake.images.render import image_facts
    from gpubake.provisioning.serving.build import build_service

    def make(image: str = "demo", **kw: Any) -> Any:
        root = tmp_path_factory.mktemp("serve")
        kw.setdefault("model_dir", tiny_nvfp4_checkpoint)
        kw.setdefault("report_path", root / "selftest.json")
        kw.setdefault("data_dir", root / "out")
        return build_service(facts=image_facts(find(image), "runpod"), **kw)

    return make


@pytest.fixture(scope="session")
def demo_facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo image's image.json as build-image writes it, for `$GPUBAKE_IMAGE_FACTS`."""
    from gpubake.images.catalog import find
    from gpubake.images.render import image_facts

    path = tmp_path_factory.mktemp("facts") / "image.json"
    image_facts(find("demo"), "runpod").write(path)
    return path


@pytest.fixture(scope="module")
def ready(make_service: Callable[..., Any]) -> Iterator[Served]:
    """The demo image's service after a passing self-test (real NVML probe: CPU mode)."""
    with serve(make_service()) as served:
        served.wait_phase("ready", "failed")
        yield served


@pytest.fixture
def hold_generator() -> Callable[[Any], tuple[threading.Event, threading.Event]]:
    return _hold_generator


@pytest.fixture(scope="module")
def serve_service() -> Callable[[Any], Any]:
    """The `serve(service)` context manager, for tests that build their own service."""
    return serve


API_KEY = "k3y-for-tests-" + "x" * 24


@pytest.fixture(scope="module")
def secured(make_service: Callable[..., Any]) -> Iterator[Served]:
    """The demo service behind an API key (requests carry it unless they pass headers)."""
    with serve(make_service(), api_key=API_KEY) as served:
        served.wait_phase("ready", "failed")
        yield served
