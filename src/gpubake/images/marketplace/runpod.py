"""RunPod through its REST API v1 (https://rest.runpod.io/v1, bearer API key).

Endpoints used, as documented at https://docs.runpod.io/api-reference:
- `GET /templates`, `POST /templates`, `PATCH /templates/{templateId}` (templates)
- `POST /pods`, `GET /pods/{podId}`, `DELETE /pods/{podId}` (pods)

REST v1 rather than GraphQL `saveTemplate`: its JSON bodies are typed fields (env as an
object, ports as a list) that need no query-string building, and its key goes in a header
(the GraphQL examples put `api_key` in the URL, where it ends up in logs).
HTTP ports are reached through RunPod's proxy, `https://{podId}-{port}.proxy.runpod.net`
(https://docs.runpod.io/pods/configuration/expose-ports); the format is overridable with
`GPUBAKE_RUNPOD_PROXY_URL` for tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpubake import envs
from gpubake.errors import GpubakeError
from gpubake.images.marketplace.http import ApiClient, MarketplaceError
from gpubake.images.marketplace.instance import Instance
from gpubake.images.marketplace.offers import Gpu, runpod_cuda_versions

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

CLOUDS = ("SECURE", "COMMUNITY")
# Fields publish compares to decide whether an existing template needs an update.
COMPARED = (
    "imageName",
    "category",
    "containerDiskInGb",
    "volumeInGb",
    "volumeMountPath",
    "ports",
    "env",
    "dockerEntrypoint",
    "dockerStartCmd",
    "isPublic",
    "isServerless",
    "readme",
    "containerRegistryAuthId",
)


def _env_dict(env: Any) -> dict[str, str]:
    """RunPod returns env as an object; older responses as [{key, value}]."""
    if isinstance(env, dict):
        return {str(k): str(v) for k, v in env.items()}
    if isinstance(env, list):
        return {str(e.get("key")): str(e.get("value")) for e in env if isinstance(e, dict)}
    return {}


def _ports_list(ports: Any) -> list[str]:
    if isinstance(ports, str):
        return [p.strip() for p in ports.split(",") if p.strip()]
    return [str(p) for p in ports or []]


def differs(existing: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    """Names of the fields where the stored template is not what we would send."""
    changed = []
    for key in COMPARED:
        if key not in desired:  # a field we do not set is the user's business
            continue
        have, want = existing.get(key), desired.get(key)
        if key == "env":
            have, want = _env_dict(have), _env_dict(want)
        elif key == "ports":
            have, want = sorted(_ports_list(have)), sorted(_ports_list(want))
        elif key in ("dockerEntrypoint", "dockerStartCmd"):
            have, want = list(have or []), list(want or [])
        if have != want:
            changed.append(key)
    return changed


class RunPod:
    """The RunPod operations gpubake needs."""

    target = "runpod"

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    # ------------------------------------------------------------ templates
    def find_template(self, name: str) -> dict[str, Any] | None:
        if not self.client.can_read():
            return None
        templates = self.client.request("GET", "/templates")
        if not isinstance(templates, list):
            raise MarketplaceError("RunPod: GET /templates: expected a list of templates")
        matches = [t for t in templates if isinstance(t, dict) and t.get("name") == name]
        return matches[0] if matches else None

    def publish(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Create the template, or update the one with the same name; no write when unchanged."""
        existing = self.find_template(payload["name"])
        if existing is None:
            created = self.client.request("POST", "/templates", json_body=payload)
            return {"action": "created", "id": (created or {}).get("id"), "changed": sorted(payload)}
        changed = differs(existing, payload)
        if not changed:
            return {"action": "unchanged", "id": existing.get("id"), "changed": []}
        body = {k: v for k, v in payload.items() if k != "isServerless"}  # fixed at creation
        self.client.request("PATCH", f"/templates/{existing['id']}", json_body=body)
        return {"action": "updated", "id": existing.get("id"), "changed": changed}

    # ------------------------------------------------------------ pods
    def create(self, spec: ImageSpec, template: dict[str, Any], gpu: Gpu, *, cloud: str, label: str,
               env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
        """Create a pod from the published template; returns (pod id, creation details)."""
        if cloud not in CLOUDS:
            raise GpubakeError(f"--cloud: must be one of {', '.join(CLOUDS)}, got {cloud!r}")
        body: dict[str, Any] = {
            "name": label,
            "templateId": template["id"],
            "imageName": template.get("imageName"),
            "computeType": "GPU",
            "gpuTypeIds": [gpu.market_id],
            "gpuCount": 1,
            "cloudType": cloud,
            "containerDiskInGb": spec.runtime.container_disk_gb,
            "volumeInGb": spec.runtime.volume_disk_gb,
            "volumeMountPath": spec.runtime.volume_mount,
            "ports": _ports_list(template.get("ports")),
            "supportPublicIp": True,
            "interruptible": False,
        }
        cuda = runpod_cuda_versions(spec)
        if cuda:
            body["allowedCudaVersions"] = cuda
        if env:  # the pod's env replaces the template's: send both
            body["env"] = {**_env_dict(template.get("env")), **env}
        if template.get("containerRegistryAuthId"):
            body["containerRegistryAuthId"] = template["containerRegistryAuthId"]
        pod = self.client.request("POST", "/pods", json_body=body)
        if self.client.dry_run:
            return "(dry-run)", {}
        if not isinstance(pod, dict) or not pod.get("id"):
            raise MarketplaceError("RunPod: POST /pods: no pod id in the response")
        return str(pod["id"]), {"cost_per_hr": _price(pod.get("costPerHr")), "gpu": gpu.market_id, "cloud": cloud}

    def status(self, pod_id: str, spec: ImageSpec) -> Instance:
        pod = self.client.request("GET", f"/pods/{pod_id}")
        if not isinstance(pod, dict):
            raise MarketplaceError(f"RunPod: GET /pods/{pod_id}: unexpected response")
        desired = str(pod.get("desiredStatus") or "").upper()
        state = {"RUNNING": "running", "EXITED": "failed", "TERMINATED": "failed"}.get(desired, "starting")
        urls: dict[str, str] = {}
        proxy = envs.GPUBAKE_RUNPOD_PROXY_URL
        mappings = pod.get("portMappings") or {}
        ip = pod.get("publicIp")
        for p in spec.runtime.ports:
            if p.protocol == "http":
                urls[p.name] = proxy.format(pod_id=pod_id, port=p.port)
            elif ip and str(p.port) in mappings:
                scheme = "ssh" if p.port == 22 else p.protocol
                urls[p.name] = f"{scheme}://{ip}:{mappings[str(p.port)]}"
        return Instance(
            id=pod_id,
            state=state,
            detail=desired.lower() or "provisioning",
            urls=urls,
            cost_per_hr=_price(pod.get("costPerHr")),
        )

    def destroy(self, pod_id: str) -> None:
        self.client.request("DELETE", f"/pods/{pod_id}")


def _price(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
