"""A local RunPod REST API v2, checked against RunPod's own OpenAPI document.

Contract: `tests/contracts/openapi/runpod-v2.json` (runpod/docs `api-reference-v2/openapi.json`,
Frontdoor v2.9.0; source and date in `tests/contracts/openapi/SOURCE.md`). Every request
this server receives and every answer it gives is validated against that document through
`FakeApi.contract`: an unknown body field, a wrong type or a missing required field is
answered `422 application/problem+json` with the reasons in `errors`, as the document says
RunPod answers it ("The body does not match the contract. Never retry."); an answer of this
fake that the document does not allow is recorded in `violations` and fails the test.

What it plays, beyond the shapes:
- bearer key: a wrong or missing key is a 401; `read_only_key` reads but gets 403 on writes
  (a key "without permission": RunPod keys are scoped, per the document's bearerAuth);
- templates: listed for their owner only (`GET /v2/templates`: "all templates owned by the
  authenticated user"); a name held by another account (`foreign_template_names`) is a 400;
- pods: created `PROVISIONING`, then `STARTING` (the image pulls), then `RUNNING`, one step
  per `provision_polls` / `pull_polls` reads of `GET /v2/pods/{id}` (`pull_polls = None`: a
  pull that never ends); `runtime` and `ssh.direct` are null until RUNNING; `env` merges the
  template's per key, body wins; `GET /v2/pods` takes no name filter (it lists every pod);
  a GPU type out of stock (`no_capacity`, "offers that vanish" between the catalog read and
  the create) or a CUDA constraint no host meets is a 400;
- serverless endpoints from serverless templates only (422 otherwise), pools from the catalog;
- `GET /v2/catalog/gpus`: GPU types with their serverless pool and list prices, and with
  `include=AVAILABILITY` a stock level;
- the pod's HTTP port through a stand-in of RunPod's proxy (`/proxy/{pod}/{port}/health`):
  502 until the pod runs and while the service does not listen (a `None` in `set_health`);
  then, with the pod's `GPUBAKE_API_KEY` as bearer, the service's full `/health` body;
  without a key liveness and verdict only; a wrong key 401;
- account secrets (`secrets`, made in RunPod's console: the vendored document has no
  secrets API): an env value `{{ RUNPOD_SECRET_name }}` is replaced by the secret's value
  in the container's environment when it starts (docs.runpod.io/pods/templates/secrets),
  while the API shows the reference; a reference to no secret fails the pod ("Make sure no
  active templates or Pods are using the secret before deletion, as this will cause those
  deployments to fail": it ends in ERROR).
The GPU catalog below is sample data shaped as the document's `GpuType`, not RunPod's list.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

import pytest
from contracts.openapi_contract import contract
from marketplace.fake_http import FakeApi

RUNPOD_KEY = "rpa_TESTKEY_7f3a9c1e5b2d4f60"

# (GPU type id, display name, serverless pool, memory GB, secure $/h, community $/h or None)
CATALOG = [
    ("NVIDIA GeForce RTX 5090", "RTX 5090", "ADA_32_PRO", 32, 0.94, 0.69),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", "ADA_24", 24, 0.69, 0.34),
    ("NVIDIA L40S", "L40S", "ADA_48_PRO", 48, 0.79, 0.79),
    ("NVIDIA L40", "L40", "ADA_48_PRO", 48, 0.99, 0.69),
    ("NVIDIA RTX A6000", "RTX A6000", "AMPERE_48", 48, 0.49, 0.33),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", "ADA_80_PRO", 80, 1.39, 1.29),
    ("NVIDIA H100 PCIe", "H100 PCIe", "ADA_80_PRO", 80, 1.99, 1.69),
    ("NVIDIA H200", "H200", "HOPPER_141", 141, 3.59, None),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", "AMPERE_80", 80, 1.49, 1.39),
]

TEMPLATE_DEFAULTS: dict[str, Any] = {
    "args": "", "disk": 20, "mounts": {}, "ports": [], "env": {}, "registry": None, "serverless": False,
    "public": False, "category": "NVIDIA", "startSsh": True, "startJupyter": True, "allowedCudaVersions": [],
}
CONTAINER = ("image", "args", "disk", "ports", "env", "registry")
SECRET_REF = re.compile(r"\{\{\s*RUNPOD_SECRET_([A-Za-z0-9_-]+)\s*\}\}")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cuda(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


class FakeRunPod(FakeApi):
    """RunPod REST v2 (templates, pods, serverless, catalog) with its lifecycle and faults."""

    contract = contract("runpod-v2")

    def __init__(self, api_key: str = RUNPOD_KEY) -> None:
        super().__init__(api_key)
        self.read_only_key: str | None = None
        self.templates: dict[str, dict[str, Any]] = {}
        self.foreign_template_names: set[str] = set()
        self.pods: dict[str, dict[str, Any]] = {}  # id -> the Pod as GET answers it
        self.pod_state: dict[str, dict[str, Any]] = {}  # id -> {"polls": n, "request": body}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.catalog = [
            {"id": i, "name": n, "pool": pool, "manufacturer": "NVIDIA", "memory": mem, "secure": True,
             "community": community is not None, "price": {"secure": secure, "community": community or 0.0, "serverless": secure * 1.6},
             "maxCount": {"secure": 8, "community": 8 if community is not None else 0}}
            for i, n, pool, mem, secure, community in CATALOG
        ]
        self.stock: dict[str, str] = {}  # GPU type id -> availability level (default HIGH)
        self.no_capacity: set[str] = set()  # GPU type ids whose create fails for capacity
        self.host_cuda = "12.9"  # what the host of every new pod reports
        self.cost_override: float | None = None  # the billed `cost`, when it differs from the list price
        self.provision_polls = 1
        self.pull_polls: int | None = 1  # None: the pull never ends
        self.error_after_pull = False  # the container fails instead of running
        self.ssh_port = 40022  # host port RunPod maps the pod's port 22 to
        self.service_key: str | None = None  # the key the pod's service takes, if not the one in its env
        self.secrets: dict[str, str] = {}  # the account's secrets, by name
        self._n = 0

    # -------------------------------------------------------- vendor conventions
    def public(self, path: str) -> bool:
        return path.startswith("/proxy/")

    def authorize(self, method: str, path: str, header: str | None) -> int | None:
        if header == f"Bearer {self.api_key}":
            return None
        if self.read_only_key and header == f"Bearer {self.read_only_key}":
            return None if method == "GET" else 403
        return 401

    def error_body(self, status: int, detail: str, errors: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"title": HTTPStatus(status).phrase, "status": status, "detail": detail}
        if errors:
            body["errors"] = errors
        return body

    def content_type(self, status: int) -> str:
        return "application/problem+json" if status >= 400 else "application/json"

    def reject(self, errors: list[str]) -> tuple[int, Any]:
        return 422, self.error_body(422, "Request validation failed.", errors)

    def _problem(self, status: int, detail: str) -> tuple[int, Any]:
        return status, self.error_body(status, detail)

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}x"

    def gpu(self, gpu_id: str) -> dict[str, Any] | None:
        return next((g for g in self.catalog if g["id"] == gpu_id), None)

    # -------------------------------------------------------- pods
    def pod_status(self, pid: str) -> str:
        polls = self.pod_state[pid]["polls"]
        if polls <= self.provision_polls:
            return "PROVISIONING"
        if self.pull_polls is None or polls <= self.provision_polls + self.pull_polls:
            return "STARTING"
        return "ERROR" if self.error_after_pull or self.container_env(pid) is None else "RUNNING"

    def container_env(self, pid: str) -> dict[str, str] | None:
        """The env the container starts with: secret references replaced by the secrets'
        values; None when one names no secret of the account (the pod cannot start)."""
        out = {}
        for key, value in self.pods[pid]["env"].items():
            if any(name not in self.secrets for name in SECRET_REF.findall(value)):
                return None
            out[key] = SECRET_REF.sub(lambda m: self.secrets[m.group(1)], value)
        return out

    def _pod_view(self, pid: str) -> dict[str, Any]:
        pod = self.pods[pid]
        status = self.pod_status(pid)
        running = status == "RUNNING"
        pod["status"] = status
        pod["actions"] = ["stop", "restart", "terminate"] if running else ["terminate"]
        assigned = status != "PROVISIONING"
        pod["dataCenterId"] = "US-TX-3" if assigned else None
        pod["cudaVersion"] = self.host_cuda if assigned else None
        pod["startedAt"] = pod["startedAt"] or (_now() if running else None)
        pod["ssh"] = {
            "proxy": {"host": "ssh.runpod.io", "port": 22, "username": f"{pid}-64411eb2",
                      "command": f"ssh {pid}-64411eb2@ssh.runpod.io"} if assigned else None,
            "direct": {"host": "127.0.0.1", "port": self.ssh_port, "username": "root",
                       "command": f"ssh root@127.0.0.1 -p {self.ssh_port}"} if running and "22/tcp" in pod["ports"] else None,
        }
        ports = []
        for spec in pod["ports"]:
            number, _, kind = spec.partition("/")
            tcp = kind == "tcp"
            ports.append({"private": int(number), "public": (self.ssh_port if number == "22" else int(number) + 30000) if tcp else None,
                          "type": kind, "ip": "127.0.0.1" if tcp else None})
        pod["runtime"] = {"uptime": 1, "ports": ports} if running else None
        return copy.deepcopy(pod)

    def _create_pod(self, body: dict[str, Any]) -> tuple[int, Any]:
        tpl = self.templates.get(body.get("templateId", "")) if body.get("templateId") else None
        if body.get("templateId") and tpl is None:
            return self._problem(404, f"template {body['templateId']} not found")
        if tpl is not None and tpl["serverless"]:
            return self._problem(422, "templateId refers to a serverless template")
        gpu_req = body.get("gpu")
        if not gpu_req:
            return self._problem(400, "exactly one of gpu or cpu must be set")
        gpu = self.gpu(gpu_req["id"])
        if gpu is None:
            return self._problem(400, f"unknown GPU type {gpu_req['id']!r}")
        cloud = body.get("cloud", "SECURE")
        if not gpu["secure" if cloud == "SECURE" else "community"]:
            return self._problem(400, f"{gpu['id']} is not offered on {cloud} cloud")
        # either CUDA field in the body replaces the template's constraint entirely
        own = "allowedCudaVersions" in gpu_req or "minCudaVersion" in gpu_req
        allowed = gpu_req.get("allowedCudaVersions") or [] if own else (tpl or {}).get("allowedCudaVersions") or []
        floor = gpu_req.get("minCudaVersion")
        if allowed and floor:
            return self._problem(400, "allowedCudaVersions and minCudaVersion are mutually exclusive")
        if gpu["id"] in self.no_capacity or (allowed and self.host_cuda not in allowed) or (
                floor and _cuda(self.host_cuda) < _cuda(floor)):
            return self._problem(400, f"There are no longer any instances available with the requested specifications ({gpu['id']})")
        pid = self._id("pod")
        merged = {k: copy.deepcopy((tpl or {}).get(k, TEMPLATE_DEFAULTS.get(k))) for k in CONTAINER}
        merged.update({k: copy.deepcopy(body[k]) for k in CONTAINER if k in body and k != "env"})
        merged["env"] = {**(tpl or {}).get("env", {}), **body.get("env", {})}
        mounts = body.get("mounts", (tpl or {}).get("mounts") or {})
        price = gpu["price"]["secure" if cloud == "SECURE" else "community"]
        self.pods[pid] = {
            "id": pid, "name": body["name"], "status": "PROVISIONING", "actions": ["terminate"], **merged,
            "mounts": mounts, "gpu": {"id": gpu["id"], "count": gpu_req.get("count", 1)}, "cloud": cloud,
            "dataCenterId": None, "cudaVersion": None, "ssh": {"proxy": None, "direct": None}, "template": None,
            "cost": float(self.cost_override if self.cost_override is not None else price), "locked": False,
            "runtime": None, "createdAt": _now(), "startedAt": None, "globalNetworking": {"enabled": False},
        }
        self.pod_state[pid] = {"polls": 0, "request": body}
        return 201, self._pod_view(pid)

    # -------------------------------------------------------- templates and endpoints
    def _template_write(self, tid: str | None, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("name")
        if name is not None:
            clash = [t for t in self.templates.values() if t["name"] == name and t["id"] != tid]
            if clash or name in self.foreign_template_names:
                return self._problem(400, f"Template name '{name}' is already in use")
        if tid is None:
            tid = self._id("tpl")
            self.templates[tid] = {"id": tid, **copy.deepcopy(TEMPLATE_DEFAULTS)}
            status = 201
        elif tid not in self.templates:
            return self._problem(404, f"template {tid} not found")
        else:
            status = 200
        tpl = self.templates[tid]
        for key, value in body.items():
            if key == "mounts" and not value:
                continue  # PATCH: {} leaves the mount unchanged
            tpl[key] = copy.deepcopy(value)
        return status, copy.deepcopy(tpl)

    def _apply_template(self, ep: dict[str, Any], tid: str, body_env: dict[str, str] | None) -> tuple[int, Any] | None:
        tpl = self.templates.get(tid)
        if tpl is None:
            return self._problem(404, f"template {tid} not found")
        if not tpl["serverless"]:
            return self._problem(422, "templateId must refer to a serverless template")
        for key in CONTAINER:
            ep[key] = copy.deepcopy(tpl[key])
        ep["env"] = {**tpl["env"], **(body_env or {})}
        if not ep["gpu"].get("allowedCudaVersions") and not ep["gpu"].get("minCudaVersion"):
            ep["gpu"]["allowedCudaVersions"] = list(tpl["allowedCudaVersions"])
        return None

    def _check_pools(self, gpu: dict[str, Any]) -> tuple[int, Any] | None:
        pools = gpu.get("pools") or []
        known = {g["pool"] for g in self.catalog if g["pool"]}
        for pool in pools:
            if pool not in known:
                return self._problem(400, f"unknown GPU pool {pool!r}")
        in_pools = {g["id"] for g in self.catalog if g["pool"] in pools}
        for excluded in gpu.get("excludedTypes") or []:
            if excluded.strip() not in in_pools:
                return self._problem(400, f"excludedTypes: {excluded!r} is not a GPU type in {pools}")
        return None

    def _endpoint_write(self, eid: str | None, body: dict[str, Any]) -> tuple[int, Any]:
        if "gpu" in body and (bad := self._check_pools(body["gpu"])):
            return bad
        if eid is None:
            eid = self._id("ep")
            ep: dict[str, Any] = {
                "id": eid, "name": body["name"], "type": body["type"], "args": "", "disk": 20, "ports": [], "env": {},
                "registry": None, "gpu": {"count": 1, "allowedCudaVersions": [], "minCudaVersion": None},
                "workers": {"min": 0, "max": 3, "idleTimeout": 10}, "scaling": body["scaling"], "dataCenterIds": [],
                "networkVolumes": [], "timeout": 300000, "flashboot": "OFF", "createdAt": _now(),
                "requestUrls": {k: f"https://api.runpod.ai/v2/{eid}/{p}" for k, p in (
                    ("run", "run"), ("runSync", "runsync"), ("status", "status/{job_id}"), ("stream", "stream/{job_id}"),
                    ("cancel", "cancel/{job_id}"), ("retry", "retry/{job_id}"), ("purgeQueue", "purge-queue"),
                    ("health", "health"))},
            }
            status = 201
        elif eid not in self.endpoints:
            return self._problem(404, f"endpoint {eid} not found")
        else:
            ep, status = copy.deepcopy(self.endpoints[eid]), 200
        if "gpu" in body:
            gpu = body["gpu"]
            if "pools" in gpu:
                ep["gpu"]["pools"] = list(gpu["pools"])
                ep["gpu"].pop("excludedTypes", None)  # pools without excludedTypes clears them
            for key in ("excludedTypes", "count", "allowedCudaVersions"):
                if key in gpu:
                    ep["gpu"][key] = copy.deepcopy(gpu[key])
            if "minCudaVersion" in gpu:
                ep["gpu"]["minCudaVersion"] = gpu["minCudaVersion"] or None
        if "templateId" in body and (bad := self._apply_template(ep, body["templateId"], body.get("env"))):
            return bad
        for key, value in body.items():
            if key in ("gpu", "templateId") or (key == "env" and "templateId" in body):
                continue
            if key == "workers":
                ep["workers"].update(value)
            else:
                ep[key] = copy.deepcopy(value)
        if "image" not in ep:
            return self._problem(400, "image or templateId is required")
        self.endpoints[eid] = ep
        return status, copy.deepcopy(ep)

    # -------------------------------------------------------- routes
    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        m = re.fullmatch(r"/proxy/([^/]+)/(\d+)/health", path)
        if m and method == "GET":
            return self._health(m.group(1))
        if path == "/v2/catalog/gpus" and method == "GET":
            gpus = copy.deepcopy(self.catalog)
            if "AVAILABILITY" in ",".join(query.get("include", [])):
                for g in gpus:
                    g["availability"] = self.stock.get(g["id"], "HIGH")
            return 200, {"gpus": gpus}
        if path == "/v2/templates":
            if method == "GET":
                return 200, {"templates": copy.deepcopy(list(self.templates.values()))}
            if method == "POST":
                return self._template_write(None, body)
        m = re.fullmatch(r"/v2/templates/([^/]+)", path)
        if m:
            tid = m.group(1)
            if method == "GET":
                return (200, copy.deepcopy(self.templates[tid])) if tid in self.templates else self._problem(404, "template not found")
            if method == "PATCH":
                return self._template_write(tid, body)
        if path == "/v2/pods":
            if method == "GET":  # no name filter: every pod of the account
                return 200, {"pods": [self._pod_view(pid) for pid in self.pods]}
            if method == "POST":
                return self._create_pod(body)
        m = re.fullmatch(r"/v2/pods/([^/]+)", path)
        if m:
            pid = m.group(1)
            if pid not in self.pods:
                return self._problem(404, "pod not found")
            if method == "GET":
                self.pod_state[pid]["polls"] += 1
                return 200, self._pod_view(pid)
            if method == "DELETE":
                del self.pods[pid]
                return 204, None
        if path == "/v2/serverless":
            if method == "GET":
                return 200, {"endpoints": copy.deepcopy(list(self.endpoints.values()))}
            if method == "POST":
                return self._endpoint_write(None, body)
        m = re.fullmatch(r"/v2/serverless/([^/]+)", path)
        if m:
            eid = m.group(1)
            if method == "GET":
                return (200, copy.deepcopy(self.endpoints[eid])) if eid in self.endpoints else self._problem(404, "endpoint not found")
            if method == "PATCH":
                return self._endpoint_write(eid, body)
        return self._problem(404, f"no route {method} {path}")

    def _health(self, pid: str) -> tuple[int, Any]:
        if pid not in self.pods or self.pod_status(pid) != "RUNNING":
            return 502, {"error": "pod not ready"}  # what RunPod's proxy answers before the port listens
        key = self.service_key or (self.container_env(pid) or {}).get("GPUBAKE_API_KEY")
        header = getattr(self.local, "headers", {}).get("Authorization")
        if key and header not in (None, f"Bearer {key}"):
            return 401, {"detail": "invalid API key"}
        rep = self.next_health(pid) if (not key or header is not None) else self.peek_health(pid)
        if rep is None:
            return 502, {"error": "pod not ready"}
        if key and header is None:  # liveness and verdict only, without the service's key
            rep = {k: rep.get(k) for k in ("status", "ready", "verdict")}
        return (200 if rep.get("ready", True) else 503), rep

    def peek_health(self, pid: str) -> dict[str, Any] | None:
        queue = self.health.get(pid)
        return queue[0] if queue else None


@pytest.fixture
def runpod(monkeypatch: pytest.MonkeyPatch):
    server = FakeRunPod().start()
    monkeypatch.setenv("RUNPOD_API_KEY", RUNPOD_KEY)
    monkeypatch.setenv("GPUBAKE_RUNPOD_API_URL", server.url + "/v2")
    monkeypatch.setenv("GPUBAKE_RUNPOD_PROXY_URL", server.url + "/proxy/{pod_id}/{port}")
    try:
        yield server
    finally:
        server.stop()
    assert not server.violations, f"the fake answered outside RunPod's document: {server.violations}"
    assert not server.refused, f"gpubake sent requests RunPod's document refuses: {server.refused}"
