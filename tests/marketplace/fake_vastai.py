"""A local stand-in for Vast.ai's REST API, held to the vendor's own OpenAPI document.

Every request the client sends is validated against `tests/contracts/openapi/vastai.yaml`
(openapi-core, `contracts.openapi_contract`: method and path, query parameters, bearer key,
JSON body with its top level closed, the create-instance limits of the source file), and
every answer this fake gives is validated against the same document. A request outside
the contract is answered 400 and recorded in `violations`; an answer outside it (a bug in
the fake) is answered 500 and recorded too; the `vast` fixture fails the test on either.
Undocumented statuses are allowed only for what sits in front of every operation (the
auth layer's 401, the rate limiter's 429, a gateway's 5xx).

What the real service does and this fake plays (the document's words in quotes):
- a bad key: 401 `{"success": false, "error": "auth_error", "msg": "Invalid user key"}`, and
  on `POST /bundles/` a 404 ("Unauthorized - invalid or missing API key"); a key without
  the permission to rent (`READONLY_KEY`) reads but is refused writes with 401;
- search: filters applied as documented (`{field: {op: value}}`), `order`, `limit`, and
  `dph_total` priced for `allocated_storage` GB ("Default is 8GB"): each offer has a GPU
  price (`dph_base`) and a storage price (`storage_cost`, $/GB/month). A numeric filter
  given a string (`driver_version: {"gte": "570.124.06"}`) is a 400: the server compares
  the integer `driver_vers` (vast-cli encodes 570.124.06 as 570124006). `unfiltered` names
  filters the fake ignores, standing in for a server that lets offers through;
- an offer is rented once: a second `PUT /asks/{id}/` answers 404 `no_such_ask`;
  `taken_after_search` offers are rented by someone else right after a search;
- the lifecycle: `actual_status` null, then "loading" ("Docker image is downloading") for
  `pull_seconds` (inf: a pull that never ends), then "running" with its ports published;
- `GET /api/v1/instances/` filters by label and pages by `next_token` (limit <= 25);
- `POST /api/v0/instances/{id}/ssh/` attaches a key to one of the account's instances
  (kept in its `ssh_keys`, as Vast.ai adds it to the container's authorized_keys);
- faults per request (`inject`): any status, a delay, `Retry-After`, and `after=True` for
  an answer that comes only after the action took effect ("5xx after success").

`GET /template/` without `select_cols` answers only id, name, image and hash_id (the
document does not say which columns the default has; the vendor's CLI always asks for
`["*"]`), and the search includes other accounts' public templates, as documented.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from typing import Any

import pytest
from contracts.openapi_contract import contract, env_entries
from marketplace.fake_http import JSON, Fault, LoopbackServer

VAST_KEY = "vast-TESTKEY-0c9e8d7b6a5f4e3d"
READONLY_KEY = "vast-READONLY-5a4b3c2d1e0f9a8b"  # a key whose permissions do not include renting
INFRA_STATUSES = {401, 429, 500, 502, 503, 504}  # answered in front of any operation
NUMERIC_FILTERS = {"num_gpus", "reliability", "disk_space", "direct_port_count", "cuda_max_good", "driver_version",
                   "compute_cap", "dph_total", "gpu_ram"}
HOURS_PER_MONTH = 30 * 24


def _cmp(have: Any, op: str, want: Any) -> bool:
    if have is None:
        return False
    if op == "eq":
        return have == want
    if op == "neq":
        return have != want
    if op == "in":
        return have in want
    if op == "notin":
        return have not in want
    return {"gt": have > want, "gte": have >= want, "lt": have < want, "lte": have <= want}[op]


class FakeVast(LoopbackServer):
    """Vast.ai's templates, offers and instances on 127.0.0.1, checked against the contract."""

    def __init__(self, api_key: str = VAST_KEY) -> None:
        super().__init__(api_key)
        self.readonly_keys = {READONLY_KEY}
        self.contract = contract("vastai")
        self.user_id = 4242
        self.templates: dict[int, dict[str, Any]] = {}
        self.offers: list[dict[str, Any]] = []
        self.rented: dict[int, dict[str, Any]] = {}  # offer id -> the offer, once rented
        self.instances: dict[str, dict[str, Any]] = {}
        self.pull_seconds = 0.1  # loading -> running after this long (math.inf: never)
        self.taken_after_search: set[int] = set()
        self.unfiltered: set[str] = set()
        self._n = 100

    # -------------------------------------------------------- control
    def inject(self, method: str, path_regex: str, status: int | None, *, times: int = 1, delay: float = 0.0,
               after: bool = False, retry_after: str | None = None) -> None:
        """The next `times` matching requests answer `status` (after `delay` seconds);
        with `after=True` the request is carried out first ("5xx after success")."""
        if retry_after is None and status in (429, 503):
            retry_after = "0"
        self.faults.append(Fault(method, path_regex, status, delay, times, after, retry_after))

    def add_instance(self, iid: str, *, label: str | None = None, dph_total: float = 0.4) -> dict[str, Any]:
        """An instance rented outside the test's launch (to destroy, or to find by label)."""
        inst = {"id": int(iid), "label": label, "offer": None, "created": time.monotonic(), "polls": 0,
                "request": {}, "dph_total": dph_total, "disk": 40}
        self.instances[iid] = inst
        return inst

    def add_foreign_template(self, name: str) -> dict[str, Any]:
        """Another account's public template of that name (the search returns it too)."""
        tpl = {"id": 7, "name": name, "image": "docker.io/someone/else:latest", "hash_id": "f" * 32,
               "creator_id": 999, "private": False, "env": "", "runtype": "args"}
        self.templates[7] = tpl
        return tpl

    # -------------------------------------------------------- pricing and search
    @staticmethod
    def price(offer: dict[str, Any], disk_gb: float) -> float:
        """$/hour for `disk_gb` of disk: the GPU's price plus the host's storage price."""
        base = offer.get("dph_base", offer.get("dph_total", 0))
        return round(float(base) + float(offer.get("storage_cost") or 0) * disk_gb / HOURS_PER_MONTH, 6)

    @staticmethod
    def _vers(version: str) -> int:
        major, minor, patch = (str(version).split(".") + ["0", "0"])[:3]
        return int(major) * 1_000_000 + int(minor) * 1_000 + int(patch)

    def _shown_offer(self, offer: dict[str, Any], disk_gb: float) -> dict[str, Any]:
        """An offer as the search answers it: a test's short dict gets the usual columns."""
        shown = {"ask_contract_id": offer["id"], "num_gpus": 1, "rentable": True, "rented": False, "verified": True,
                 "direct_port_count": 100, "storage_cost": 0.0, "reliability": offer.get("reliability2", 0.99),
                 **offer}
        shown.setdefault("dph_base", offer.get("dph_total", 0))
        if "driver_version" in shown:
            shown.setdefault("driver_vers", self._vers(shown["driver_version"]))
        shown["dph_total"] = self.price(shown, disk_gb)
        return shown

    def _search(self, body: dict[str, Any]) -> tuple[int, Any]:
        storage = float(body.get("allocated_storage") or 8)
        for name, cond in body.items():
            if name in NUMERIC_FILTERS and isinstance(cond, dict):
                for op, value in cond.items():
                    values = value if op in ("in", "notin") and isinstance(value, list) else [value]
                    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                        return 400, {"error": "invalid_request", "msg": f"{name}: {op} takes a number, got {value!r}"}
        shown = [self._shown_offer(o, storage) for o in self.offers]
        out = []
        for offer in shown:
            ok = True
            for name, cond in body.items():
                if not isinstance(cond, dict) or name in self.unfiltered:
                    continue
                column = {"driver_version": "driver_vers", "reliability": "reliability2"}.get(name, name)
                have = offer.get(column)
                if name == "rented":
                    have = False  # offers still on the market; rented ones left self.offers
                if not all(_cmp(have, op, want) for op, want in cond.items()):
                    ok = False
                    break
            if ok:
                out.append(offer)
        for field, direction in body.get("order") or []:
            out.sort(key=lambda o, f=field: o.get(f) or 0, reverse=direction == "desc")
        out = out[: int(body.get("limit") or 64)]
        with self.lock:
            self.offers = [o for o in self.offers if o["id"] not in self.taken_after_search]
            self.taken_after_search.clear()
        return 200, {"offers": out}

    # -------------------------------------------------------- routes
    def _status(self, inst: dict[str, Any]) -> dict[str, Any]:
        inst["polls"] += 1
        elapsed = time.monotonic() - inst["created"]
        if inst.get("exited"):
            actual, msg = "exited", "Error response from daemon: container exited (1)"
        elif inst["polls"] == 1 and self.pull_seconds > 0:
            actual, msg = None, None  # scheduled, not started
        elif elapsed < self.pull_seconds:
            done = 0 if math.isinf(self.pull_seconds) else int(100 * elapsed / self.pull_seconds)
            actual, msg = "loading", f"Pulling image: {done}% of layers downloaded"
        else:
            actual, msg = "running", "success, running"
        running = actual == "running"
        return {
            "id": inst["id"], "actual_status": actual, "intended_status": "running", "cur_state": "running",
            "next_state": "running", "label": inst.get("label"), "status_msg": msg,
            "public_ipaddr": "127.0.0.1", "dph_total": inst["dph_total"], "disk_space": float(inst["disk"]),
            "ssh_host": "127.0.0.1", "ssh_port": 40022,
            "ports": {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(self.port)}],
                      "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}]} if running else {},
        }

    def _rent(self, offer_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            offer = next((o for o in self.offers if o["id"] == offer_id), None)
            if offer is None:
                return 404, {"success": False, "error": "invalid_args", "ask_id": offer_id,
                             "msg": f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available."}
            tpl = next((t for t in self.templates.values() if t["hash_id"] == body.get("template_hash_id")), None)
            if tpl is None or (tpl.get("private") and tpl.get("creator_id") != self.user_id):
                return 400, {"success": False, "error": "invalid_args", "ask_id": offer_id,
                             "msg": "error 400/3467: Invalid args: template_hash_id: no such template"}
            disk = float(body.get("disk") or tpl.get("recommended_disk_space") or 8)
            if disk > float(offer.get("disk_space") or 0):
                return 400, {"success": False, "error": "invalid_args", "ask_id": offer_id,
                             "msg": f"error 400/3467: Invalid args: disk {disk:g} GB > {offer.get('disk_space')} GB free"}
            self._n += 1
            iid = str(self._n)
            env = {**env_entries(tpl.get("env") or ""), **env_entries(body.get("env") or "")}
            self.instances[iid] = {"id": int(iid), "label": body.get("label"), "offer": offer_id, "polls": 0,
                                   "created": time.monotonic(), "request": body, "env": env, "disk": disk,
                                   "dph_total": self.price(self._shown_offer(offer, disk), disk)}
            self.offers = [o for o in self.offers if o["id"] != offer_id]  # one instance per offer
            self.rented[offer_id] = offer
        return 200, {"success": True, "new_contract": int(iid)}

    def _list_instances(self, query: dict[str, str]) -> tuple[int, Any]:
        filters = json.loads(query.get("select_filters") or "{}")
        limit = int(query.get("limit") or 25)
        limit = 5 if limit <= 0 else limit
        rows = sorted(self.instances.values(), key=lambda i: i["id"])
        for name, cond in filters.items():
            rows = [r for r in rows if all(_cmp(r.get(name), op, want) for op, want in cond.items())]
        after = int(base64.b64decode(query["after_token"]).decode()) if query.get("after_token") else 0
        rows = [r for r in rows if r["id"] > after]
        page, rest = rows[:limit], rows[limit:]
        token = base64.b64encode(str(page[-1]["id"]).encode()).decode() if rest else None
        shown = [{"id": r["id"], "label": r.get("label"), "actual_status": "loading"} for r in page]
        return 200, {"success": True, "instances_found": len(shown), "total_instances": len(rows),
                     "next_token": token, "instances": shown}

    def route(self, method: str, path: str, query: dict[str, str], body: Any, readonly: bool) -> tuple[int, Any]:
        if path == "/health" and method == "GET":  # the rented machine's port 8000, published on this host port
            newest = max(self.instances, key=int, default=None)
            rep = self.next_health(newest) if newest else None
            return (502, {"error": "not up"}) if rep is None else ((200 if rep.get("ready", True) else 503), rep)
        if readonly and method in ("POST", "PUT", "DELETE") and path != "/api/v0/bundles/":
            return 401, {"success": False, "error": "auth_error",
                         "msg": "This API key does not have the permission for this operation"}
        if path == "/api/v0/users/current/" and method == "GET":
            return 200, {"id": self.user_id, "email": "tester@example.com", "balance": 25.0}
        if path == "/api/v0/template/" and method == "GET":
            filters = json.loads(query.get("select_filters") or "{}")
            out = [t for t in self.templates.values() if not t.get("private") or t.get("creator_id") == self.user_id]
            for key, cond in filters.items():
                out = [t for t in out if all(_cmp(t.get(key), op, want) for op, want in cond.items())]
            if json.loads(query.get("select_cols") or "null") != ["*"]:
                out = [{k: t[k] for k in ("id", "name", "image", "hash_id")} for t in out]
            else:
                out = [{k: v for k, v in t.items() if not k.startswith("_")} for t in out]
            return 200, {"success": True, "templates_found": len(out), "templates": out}
        if path == "/api/v0/template/" and method == "POST":
            self._n += 1
            tpl = {k: v for k, v in body.items() if k != "docker_login_pass"}
            tpl.update(id=self._n, hash_id=hashlib.md5(json.dumps(body, sort_keys=True).encode()).hexdigest(),
                       creator_id=self.user_id, _has_login=bool(body.get("docker_login_pass")))
            self.templates[self._n] = tpl
            return 200, {"success": True, "msg": f"Template Created Successfully! New Template ID: {self._n}",
                         "template": {"id": self._n, "hash_id": tpl["hash_id"], "name": tpl["name"]}}
        if path == "/api/v0/template/" and method == "PUT":
            match = [t for t in self.templates.values()
                     if t["hash_id"] == body.get("hash_id") and t.get("creator_id") == self.user_id]
            if not match:
                return 404, None  # documented without a body
            tpl = match[0]
            tpl.update({k: v for k, v in body.items() if k not in ("hash_id", "docker_login_pass")})
            tpl["hash_id"] = hashlib.md5(json.dumps(tpl, sort_keys=True).encode()).hexdigest()
            return 200, {"success": True, "template": {"id": tpl["id"], "hash_id": tpl["hash_id"]}}
        if path == "/api/v0/bundles/" and method == "POST":
            return self._search(body)
        m = re.fullmatch(r"/api/v0/asks/(\d+)/", path)
        if m and method == "PUT":
            return self._rent(int(m.group(1)), body)
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        if m and method == "GET":
            inst = self.instances.get(m.group(1))
            if inst is None:
                return 400, {"success": False, "error": "invalid_args", "msg": f"no instance {m.group(1)} of yours"}
            return 200, {"instances": self._status(inst)}
        if m and method == "DELETE":
            with self.lock:
                if self.instances.pop(m.group(1), None) is None:
                    return 404, {"success": False, "error": "not_found", "msg": "Instance not found"}
            return 200, {"success": True, "msg": "Instance destroyed successfully"}
        if path == "/api/v1/instances/" and method == "GET":
            return self._list_instances(query)
        m = re.fullmatch(r"/api/v0/instances/(\d+)/ssh/", path)
        if m and method == "POST":
            with self.lock:
                inst = self.instances.get(m.group(1))
                if inst is None:
                    return 404, {"success": False, "error": "no_such_instance", "msg": f"no instance {m.group(1)} of yours"}
                keys = inst.setdefault("ssh_keys", [])
                if body["ssh_key"] not in keys:
                    keys.append(body["ssh_key"])
            return 200, {"success": True, "msg": "SSH key attached successfully"}
        return 404, {"success": False, "error": "not_found", "msg": f"no route {method} {path}"}

    # -------------------------------------------------------- plumbing
    def _answer(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
                ) -> tuple[int, Any, dict[str, str]]:
        api = path.startswith("/api/")
        if api:
            auth = {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}
            errors = self.contract.request_errors(method, path, query=query, body=body, headers=auth)
            if errors:
                self.violations.append(f"request {method} {path}: " + "; ".join(errors))
                return 400, {"success": False, "error": "invalid_args", "msg": "; ".join(errors)[:500]}, {}
        fault = self.take_fault(method, path)
        extra = {"Retry-After": fault.retry_after} if fault and fault.retry_after is not None else {}
        if fault and not fault.after and fault.status is not None:
            time.sleep(fault.delay)
            return fault.status, {"success": False, "error": "injected", "msg": f"injected {fault.status}"}, extra
        key = (headers.get("Authorization") or "").removeprefix("Bearer ")
        readonly = key in self.readonly_keys
        if api and key != self.api_key and not readonly:
            if path == "/api/v0/bundles/":  # the document's answer for this operation
                return 404, {"error": "auth_error", "msg": "Invalid user key"}, {}
            return 401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}, {}
        status, payload = self.route(method, path, query, body, readonly)
        if fault:  # after=True, or a slow real answer
            time.sleep(fault.delay)
            if fault.status is not None:
                status, payload = fault.status, {"success": False, "error": "injected", "msg": f"injected {fault.status}"}
        return status, payload, extra

    def _checked(self, method: str, path: str, status: int, payload: Any) -> tuple[int, Any]:
        if not path.startswith("/api/"):
            return status, payload
        _, op = self.contract.route(method, path)
        documented = str(status) in op.get("responses", {})
        if not documented:
            if status in INFRA_STATUSES:
                return status, payload
            errors = [f"status {status} is not documented"]
        else:
            errors = self.contract.response_errors(method, path, status, payload)
        if errors:
            self.violations.append(f"response {method} {path} -> {status}: " + "; ".join(errors))
            return 500, {"success": False, "error": "fake_bug", "msg": "the fake answered outside the contract"}
        return status, payload

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str], str]:
        single = {k: v[0] for k, v in query.items()}  # Vast.ai's parameters are single-valued
        status, payload, extra = self._answer(method, path, single, headers, body)
        status, payload = self._checked(method, path, status, payload)
        return status, payload, extra, JSON


def offer(oid: int, *, price: float, driver: str = "575.57.08", cuda: float = 12.9, rel: float = 0.995,
          gpu: str = "L40S", cap: int = 890, storage_cost: float = 0.0, disk: float = 200.0) -> dict:
    """An offer shaped like the search-offers response: `price` is the GPU's $/h (`dph_base`); the
    fake adds `storage_cost` ($/GB/month) for the disk searched for, as `dph_total`."""
    major, minor, patch = (int(p) for p in driver.split("."))
    return {"id": oid, "ask_contract_id": oid, "gpu_name": gpu, "num_gpus": 1, "dph_base": price,
            "storage_cost": storage_cost, "driver_version": driver, "driver_vers": major * 10**6 + minor * 10**3 + patch,
            "cuda_max_good": cuda, "reliability2": rel, "reliability": rel, "compute_cap": cap, "disk_space": disk,
            "direct_port_count": 40, "verified": True, "rentable": True, "rented": False, "geolocation": "SE"}


@pytest.fixture
def vast(monkeypatch: pytest.MonkeyPatch):
    """FakeVast on loopback, with VAST_API_KEY and the API URL pointing at it; the test fails
    if gpubake sent a request (or the fake gave an answer) outside Vast.ai's document."""
    from gpubake.images.marketplace.vastai import Vast

    server = FakeVast().start()
    monkeypatch.setenv("VAST_API_KEY", VAST_KEY)
    monkeypatch.setenv("GPUBAKE_VAST_API_URL", server.url + "/api/v0")
    monkeypatch.setattr(Vast, "lookup_delay", 0.05)
    try:
        yield server
    finally:
        server.stop()
    assert server.violations == [], "outside Vast.ai's OpenAPI document:\n" + "\n".join(server.violations)
