"""RunPod through its REST API v2 (https://api.runpod.io/v2, bearer API key).

REST v1 (https://rest.runpod.io/v1) was retired on 2026-11-15 and answers 410 Gone. The v2
contract gpubake follows is RunPod's own OpenAPI document, vendored with its source and
date under `tests/contracts/openapi/` (runpod-v2.json); the contract tests validate every
request sent here against it. Operations used (operationId):
- templates: `GET /templates` (listTemplates: `{"templates": [...]}`, the caller's own),
  `POST /templates` (createTemplate), `PATCH /templates/{id}` (updateTemplate);
- pods: `POST /pods` (createPod), `GET /pods/{id}` (getPod), `GET /pods` (listPods, no
  name filter: matched here), `DELETE /pods/{id}` (deletePod, 204);
- serverless: `GET /serverless` (listEndpoints), `POST /serverless` (createEndpoint),
  `PATCH /serverless/{id}` (updateEndpoint);
- `GET /catalog/gpus` (listGpuTypes): GPU type ids, serverless pools, list prices, stock,
  and each type's `memory` ("VRAM in GB"): RunPod's API takes no memory floor (neither a pod's
  `gpu` nor an endpoint's), so an image's `min_gpu_memory_gb` is applied here, to the GPU a
  pod is created on and to the types a serverless endpoint may place workers on.

Why v2's `status` and not v1's `desiredStatus`: the latter is the *desired* state, RUNNING
from the moment of creation, so a pod still pulling its image looked running. v2 reports
PROVISIONING (a machine is being assigned) -> STARTING (the image pulls, the container
starts) -> RUNNING, which `launch` shows as its phases; ready is decided by the image's own
`/health`, never by this status. v2 gives no pull progress (bytes) for pods.

HTTP ports are reached through RunPod's proxy, `https://{podId}-{port}.proxy.runpod.net`
(https://docs.runpod.io/pods/configuration/expose-ports); the format is overridable with
`GPUBAKE_RUNPOD_PROXY_URL` for tests.
"""

from __future__ import annotations

import json
import re
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from gpubake import envs
from gpubake.console import console
from gpubake.errors import GpubakeError
from gpubake.images.marketplace.http import AmbiguousError, ApiClient, MarketplaceError
from gpubake.images.marketplace.instance import Instance
from gpubake.images.marketplace.offers import Gpu, check_gpu_memory

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

CLOUDS = ("SECURE", "COMMUNITY")
# Template fields publish compares to decide whether an existing template needs an update.
COMPARED = ("image", "category", "disk", "mounts", "ports", "env", "args", "public", "serverless", "registry",
            "startSsh", "startJupyter", "allowedCudaVersions")
# Pod status -> (launch state, phase); RUNNING is "booting" until the image's /health answers.
STATUS = {
    "PROVISIONING": ("starting", "scheduled"),
    "STARTING": ("starting", "pulling"),
    "RUNNING": ("running", "booting"),
    "EXITED": ("failed", "failed"),
    "ERROR": ("failed", "failed"),
    "TERMINATED": ("failed", "failed"),
}
LOOKUPS = 3  # listPods reads after an ambiguous create before "there is none" is believed


def _env_dict(env: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def differs(existing: dict[str, Any], desired: dict[str, Any], fields: tuple[str, ...] = COMPARED) -> list[str]:
    """Names of the fields where the stored object is not what we would send."""
    changed = []
    for key in fields:
        if key not in desired:  # a field we do not set is the user's business
            continue
        have, want = existing.get(key), desired.get(key)
        if key == "env":
            have, want = _env_dict(have), _env_dict(want)
        elif key in ("ports", "allowedCudaVersions"):
            have, want = sorted(have or []), sorted(want or [])
        elif key == "mounts":  # v2 may omit `mounts` when there is none (runpod-python#584)
            have, want = have or {}, want or {}
        if have != want:
            changed.append(key)
    return changed


def _norm(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()


def table_gpus(archs: list[str], min_memory_gb: int | None = None) -> list[str]:
    """RunPod GPU type ids of gpubake's GPU table (marketplace/data/gpus.json) with these archs
    and at least `min_memory_gb` of memory."""
    text = resources.files("gpubake.images.marketplace").joinpath("data", "gpus.json").read_text(encoding="utf-8")
    return [row["runpod"] for row in json.loads(text)["gpus"].values()
            if row["arch"] in archs and (min_memory_gb is None or row["memory_gb"] >= min_memory_gb)]


def _memory(row: dict[str, Any]) -> int | None:
    """A catalog GpuType's `memory` (GB), None when absent or not a number."""
    value = row.get("memory")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RunPod:
    """The RunPod operations gpubake needs."""

    target = "runpod"

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    # ------------------------------------------------------------ catalog
    def catalog(self, **params: str) -> list[dict[str, Any]] | None:
        """GPU types of `GET /catalog/gpus`, or None when nothing may be read (dry-run, no key)."""
        if not self.client.can_read():
            return None
        data = self.client.request("GET", "/catalog/gpus", params=params or None)
        gpus = data.get("gpus") if isinstance(data, dict) else None
        if not isinstance(gpus, list):
            raise MarketplaceError("RunPod: GET /catalog/gpus: expected {\"gpus\": [...]}")
        return [g for g in gpus if isinstance(g, dict)]

    def check_gpu(self, gpu: Gpu, spec: ImageSpec, *, cloud: str, max_price: float | None) -> Gpu:
        """The GPU as RunPod's catalog names it; one-line errors, before anything is rented, for
        an unknown GPU, a cloud it is not on, a list price over `--max-price`, or no stock."""
        if cloud not in CLOUDS:
            raise GpubakeError(f"--cloud: must be one of {', '.join(CLOUDS)}, got {cloud!r}")
        if max_price is not None and max_price <= 0:
            raise GpubakeError(f"--max-price: must be > 0 $/hour, got {max_price}")
        params = {"include": "AVAILABILITY", "product": "POD", "cloud": cloud}
        if spec.cuda != "none":
            params["minCudaVersion"] = spec.cuda
        types = self.catalog(**params)
        if types is None:
            return gpu
        wanted = _norm(gpu.market_id)
        row = next((g for g in types if _norm(str(g.get("id"))) == wanted), None) or next(
            (g for g in types if _norm(str(g.get("name"))) in (wanted, _norm(gpu.name))), None)
        if row is None:
            known = ", ".join(sorted(str(g.get("id")) for g in types)[:6])
            raise GpubakeError(f"--gpu: RunPod has no GPU type {gpu.name!r} (its catalog lists e.g. {known})")
        gid = str(row["id"])
        check_gpu_memory(spec, gpu, memory_gb=_memory(row), where="RunPod's catalog")
        if not row.get(cloud.lower(), True):
            other = next(c for c in CLOUDS if c != cloud)
            raise GpubakeError(f"--cloud: RunPod offers {gid} on {other} cloud only, not {cloud}")
        price = (row.get("price") or {}).get(cloud.lower())
        if max_price is not None and isinstance(price, (int, float)) and price > max_price:
            raise GpubakeError(f"--max-price: RunPod lists {gid} at ${price:.3f}/h on {cloud} cloud, over ${max_price}/h; "
                               "nothing was rented")
        if row.get("availability") == "NONE":
            cuda = f" with CUDA >= {spec.cuda}" if spec.cuda != "none" else ""
            raise GpubakeError(f"--gpu: RunPod has no {gid} free on {cloud} cloud{cuda} right now; try another --gpu or --cloud")
        return Gpu(gpu.name, gid, gpu.arch, _memory(row) or gpu.memory_gb)

    # ------------------------------------------------------------ templates
    def find_template(self, name: str) -> dict[str, Any] | None:
        if not self.client.can_read():
            return None
        data = self.client.request("GET", "/templates")
        templates = data.get("templates") if isinstance(data, dict) else None
        if not isinstance(templates, list):
            raise MarketplaceError("RunPod: GET /templates: expected {\"templates\": [...]}")
        matches = [t for t in templates if isinstance(t, dict) and t.get("name") == name]
        return matches[0] if matches else None

    def publish(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Create the template, or update the one with the same name; no write when unchanged."""
        existing = self.find_template(payload["name"])
        if existing is None:
            try:
                created = self.client.request("POST", "/templates", json_body=payload)
            except MarketplaceError as exc:
                if exc.status == 400 and "name" in str(exc).lower():
                    raise GpubakeError(
                        f"--image: RunPod refused the template name {payload['name']!r}: none of your templates has it, "
                        f"so another account holds it ({exc})") from None
                raise
            return {"action": "created", "id": (created or {}).get("id"), "changed": sorted(payload)}
        changed = differs(existing, payload)
        if not changed:
            return {"action": "unchanged", "id": existing.get("id"), "changed": []}
        self.client.request("PATCH", f"/templates/{existing['id']}", json_body=payload)
        return {"action": "updated", "id": existing.get("id"), "changed": changed}

    # ------------------------------------------------------------ pods
    def create(self, spec: ImageSpec, template: dict[str, Any], gpu: Gpu, *, cloud: str, label: str,
               env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
        """Create a pod from the published template; returns (pod id, creation details).

        The template's container settings (image, disk, mounts, ports, env) are resolved by
        RunPod at create time; the body adds the GPU, the cloud, the host CUDA floor and the
        launch's own env (merged per key with the template's, ours winning). A create that
        ends ambiguously is never retried: the pod is looked up by its unique name.
        """
        if cloud not in CLOUDS:
            raise GpubakeError(f"--cloud: must be one of {', '.join(CLOUDS)}, got {cloud!r}")
        gpu_body: dict[str, Any] = {"id": gpu.market_id, "count": 1}
        if spec.cuda != "none":
            # a numeric floor: the template's allowedCudaVersions is an exact set, and a set
            # naming a version no host reports fails on capacity instead of matching newer ones
            gpu_body["minCudaVersion"] = spec.cuda
        body: dict[str, Any] = {"name": label, "templateId": template["id"], "cloud": cloud, "gpu": gpu_body}
        if env:
            body["env"] = dict(env)
        adopted = False
        try:
            pod = self.client.request("POST", "/pods", json_body=body)
        except AmbiguousError as exc:
            pod, adopted = self.find_pod(label, after=exc), True
        if self.client.dry_run:
            return "(dry-run)", {}
        if not isinstance(pod, dict) or not pod.get("id"):
            raise MarketplaceError("RunPod: POST /pods: no pod id in the response")
        info = {"cost_per_hr": _price(pod.get("cost")), "gpu": gpu.market_id, "cloud": cloud, "label": label}
        if adopted:
            info["adopted"] = True
        return str(pod["id"]), info

    def find_pod(self, label: str, *, after: AmbiguousError) -> dict[str, Any]:
        """The pod named `label` after a create that ended ambiguously, or an error proving there is none.

        listPods has no name filter, so every pod is listed and matched here; the name is
        unique per launch (random suffix). A few reads, a little apart, so that a pod the
        API has not listed yet is not taken for no pod.
        """
        for attempt in range(LOOKUPS):
            if attempt:
                time.sleep(max(self.client.backoff, 0.01) * 2**attempt)
            try:
                data = self.client.request("GET", "/pods")
            except MarketplaceError as exc:
                raise MarketplaceError(
                    f"{after}; looking for the pod named {label} failed too ({exc}): a pod may be running and billed: "
                    "check https://console.runpod.io/pods and destroy it with `gpubake destroy --target runpod ID`") from None
            pods = data.get("pods") if isinstance(data, dict) else None
            mine = [p for p in pods or [] if isinstance(p, dict) and p.get("name") == label and p.get("id")]
            if mine:
                for extra in mine[1:]:  # cannot happen with a unique name; never leave one behind
                    self.destroy(str(extra["id"]))
                console.print(f"RunPod answered the create ambiguously ({after.status or 'no answer'}); "
                              f"found pod {mine[0]['id']} named {label}: adopting it", markup=False)
                return mine[0]
        raise MarketplaceError(f"{after}; but no pod named {label} exists (looked {LOOKUPS} times): nothing was rented")

    def status(self, pod_id: str, spec: ImageSpec) -> Instance:
        pod = self.client.request("GET", f"/pods/{pod_id}")
        if not isinstance(pod, dict):
            raise MarketplaceError(f"RunPod: GET /pods/{pod_id}: unexpected response")
        status = str(pod.get("status") or "PROVISIONING").upper()
        state, phase = STATUS.get(status, ("starting", "scheduled"))
        urls: dict[str, str] = {}
        proxy = envs.GPUBAKE_RUNPOD_PROXY_URL
        runtime = pod.get("runtime") if isinstance(pod.get("runtime"), dict) else {}
        public = {(p.get("private"), p.get("type")): p for p in runtime.get("ports") or [] if isinstance(p, dict)}
        direct = (pod.get("ssh") or {}).get("direct") if isinstance(pod.get("ssh"), dict) else None
        for p in spec.runtime.ports:
            if p.protocol == "http":
                urls[p.name] = proxy.format(pod_id=pod_id, port=p.port)
            elif p.port == 22 and isinstance(direct, dict) and direct.get("host") and direct.get("port"):
                urls[p.name] = f"ssh://{direct['host']}:{direct['port']}"
            elif (m := public.get((p.port, "tcp"))) and m.get("ip") and m.get("public"):
                scheme = "ssh" if p.port == 22 else p.protocol
                urls[p.name] = f"{scheme}://{m['ip']}:{m['public']}"
        return Instance(id=pod_id, state=state, detail=status.lower(), urls=urls, cost_per_hr=_price(pod.get("cost")),
                        phase=phase)

    def destroy(self, pod_id: str) -> None:
        self.client.request("DELETE", f"/pods/{pod_id}")

    # ------------------------------------------------------------ serverless
    def serverless_gpus(self, spec: ImageSpec, gpus: list[Gpu]) -> dict[str, Any]:
        """The endpoint's `gpu` block: the serverless pools holding these GPU types, minus the
        other types in those pools (`excludedTypes`), one GPU per worker, the CUDA floor. With
        `min_gpu_memory_gb`, a named type below it is refused and every smaller type of the
        catalog is left out (so excluded from its pool)."""
        floor = spec.min_gpu_memory_gb
        wanted = [g.market_id for g in gpus] or table_gpus(spec.gpu_archs, floor)
        block: dict[str, Any] = {"count": 1}
        if spec.cuda != "none":
            block["minCudaVersion"] = spec.cuda
        types = self.catalog()
        if types is None:  # dry-run without a key: the pools are not known
            return {"pools": ["<pools of GET /v2/catalog/gpus>"], **block}
        by_id = {_norm(str(g.get("id"))): g for g in types}
        chosen = [by_id[_norm(w)] for w in wanted if _norm(w) in by_id]
        for gpu in gpus:  # a GPU the user named: refused when RunPod lists it below the floor
            if (row := by_id.get(_norm(gpu.market_id))) is not None:
                check_gpu_memory(spec, gpu, memory_gb=_memory(row), where="RunPod's catalog")
        if floor is not None:  # a type of unknown memory is not trusted to have enough
            chosen = [g for g in chosen if (_memory(g) or 0) >= floor]
        pools = sorted({str(g["pool"]) for g in chosen if g.get("pool")})
        if not pools:
            names = ", ".join(wanted) or "(none: gpu_archs is empty)"
            memory = f" with >= {floor} GB of memory (min_gpu_memory_gb)" if floor is not None else ""
            raise GpubakeError(f"--gpu: none of {names} is in a RunPod serverless pool{memory}")
        keep = {str(g["id"]) for g in chosen}
        excluded = sorted(str(g["id"]) for g in types if g.get("pool") in pools and str(g["id"]) not in keep)
        out: dict[str, Any] = {"pools": pools, **block}
        if excluded:
            out["excludedTypes"] = excluded
        return out

    def find_endpoint(self, name: str) -> dict[str, Any] | None:
        if not self.client.can_read():
            return None
        data = self.client.request("GET", "/serverless")
        endpoints = data.get("endpoints") if isinstance(data, dict) else None
        if not isinstance(endpoints, list):
            raise MarketplaceError("RunPod: GET /serverless: expected {\"endpoints\": [...]}")
        return next((e for e in endpoints if isinstance(e, dict) and e.get("name") == name), None)

    def publish_endpoint(self, body: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
        """Create the serverless endpoint named `body["name"]`, or update it when its container
        (from `template`, applied once: RunPod keeps no link) or its settings differ."""
        existing = self.find_endpoint(body["name"])
        if existing is None:
            created = self.client.request("POST", "/serverless", json_body=body)
            return {"action": "created", "id": (created or {}).get("id"), "changed": sorted(body), "url": _run_url(created)}
        want = {k: template[k] for k in ("image", "disk") if k in template}
        want["env"] = {**_env_dict(template.get("env")), **_env_dict(body.get("env"))}
        changed = differs(existing, want, ("image", "disk", "env"))
        have_gpu = existing.get("gpu") or {}
        for key, value in body["gpu"].items():
            if key == "excludedTypes" or key == "pools":
                if sorted(have_gpu.get(key) or []) != sorted(value):
                    changed.append(f"gpu.{key}")
            elif have_gpu.get(key) != value:
                changed.append(f"gpu.{key}")
        if "excludedTypes" not in body["gpu"] and have_gpu.get("excludedTypes"):
            changed.append("gpu.excludedTypes")
        for key in ("workers", "scaling", "flashboot", "timeout"):
            have = existing.get(key)
            if key == "workers" and isinstance(have, dict):
                have = {k: have.get(k) for k in body[key]}
            if key in body and have != body[key]:
                changed.append(key)
        if not changed:
            return {"action": "unchanged", "id": existing.get("id"), "changed": [], "url": _run_url(existing)}
        update = {k: v for k, v in body.items() if k not in ("name", "type")}  # the type is chosen at creation
        self.client.request("PATCH", f"/serverless/{existing['id']}", json_body=update)
        return {"action": "updated", "id": existing.get("id"), "changed": changed, "url": _run_url(existing)}


def _run_url(endpoint: Any) -> str | None:
    urls = endpoint.get("requestUrls") if isinstance(endpoint, dict) else None
    return urls.get("run") if isinstance(urls, dict) else None


def _price(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
