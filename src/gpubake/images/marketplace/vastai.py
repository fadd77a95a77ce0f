"""Vast.ai through its REST API (https://console.vast.ai/api/v0, bearer API key).

Endpoints used, as documented at https://docs.vast.ai/api-reference:
- `GET /users/current/` (the account id, to find only our own templates)
- `GET /template/?select_filters=...` (search templates), `POST /template/` (create),
  `PUT /template/` with `hash_id` (edit; the hash changes, the numeric id does not)
- `POST /bundles/` (search offers), `PUT /asks/{offer_id}/` (create instance, returns
  `new_contract`), `GET /instances/{id}/` (`{"instances": {...}}`), `DELETE /instances/{id}/`

Ports of a running instance are published on the host's public address:
`ports["8000/tcp"][0]["HostPort"]` on `public_ipaddr`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gpubake.images.marketplace.http import ApiClient, MarketplaceError
from gpubake.images.marketplace.instance import Instance
from gpubake.images.marketplace.offers import OfferPolicy

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

# Fields publish compares (the password is write-only at Vast.ai and never compared).
COMPARED = ("image", "env", "onstart", "runtype", "args_str", "use_ssh", "ssh_direct", "jup_direct",
            "recommended_disk_space", "desc", "readme", "extra_filters", "docker_login_repo", "docker_login_user")
FAILED = {"exited", "offline", "unknown"}


def differs(existing: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    changed = []
    for key in COMPARED:
        if key not in desired:
            continue
        have, want = existing.get(key), desired[key]
        if key == "recommended_disk_space":
            have, want = float(have or 0), float(want or 0)
        if have != want:
            changed.append(key)
    return changed


class Vast:
    """The Vast.ai operations gpubake needs."""

    target = "vastai"

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    # ------------------------------------------------------------ templates
    def _user_id(self) -> int:
        user = self.client.request("GET", "/users/current/")
        if not isinstance(user, dict) or "id" not in user:
            raise MarketplaceError("Vast.ai: GET /users/current/: no account id in the response")
        return int(user["id"])

    def find_template(self, name: str) -> dict[str, Any] | None:
        if not self.client.can_read():
            return None
        filters = {"name": {"eq": name}, "creator_id": {"eq": self._user_id()}}
        data = self.client.request("GET", "/template/", params={"select_filters": json.dumps(filters, sort_keys=True)})
        templates = (data or {}).get("templates") if isinstance(data, dict) else None
        if not isinstance(templates, list):
            raise MarketplaceError("Vast.ai: GET /template/: expected {'templates': [...]}")
        matches = [t for t in templates if isinstance(t, dict) and t.get("name") == name]
        matches.sort(key=lambda t: int(t.get("id") or 0), reverse=True)  # newest first
        return matches[0] if matches else None

    def publish(self, payload: dict[str, Any]) -> dict[str, Any]:
        existing = self.find_template(payload["name"])
        if existing is None:
            created = self.client.request("POST", "/template/", json_body=payload)
            tpl = (created or {}).get("template") or {}
            return {"action": "created", "id": tpl.get("id"), "hash_id": tpl.get("hash_id"), "changed": sorted(payload)}
        changed = differs(existing, payload)
        if not changed and "docker_login_pass" not in payload:
            return {"action": "unchanged", "id": existing.get("id"), "hash_id": existing.get("hash_id"), "changed": []}
        body = {"hash_id": existing["hash_id"], **payload}
        updated = self.client.request("PUT", "/template/", json_body=body)
        tpl = (updated or {}).get("template") or {}
        return {
            "action": "updated",
            "id": existing.get("id"),
            "hash_id": tpl.get("hash_id", existing.get("hash_id")),
            "changed": changed or ["docker_login_pass"],
        }

    # ------------------------------------------------------------ instances
    def search_offers(self, policy: OfferPolicy) -> list[dict[str, Any]]:
        if not self.client.can_read():  # dry-run without a key: show the search, send nothing
            self.client.plan("POST", "/bundles/", policy.query())
            return []
        data = self.client.request("POST", "/bundles/", json_body=policy.query(), read_only=True)
        if self.client.dry_run and data is None:
            return []
        offers = (data or {}).get("offers") if isinstance(data, dict) else None
        if isinstance(offers, dict):  # a single offer comes back as an object
            offers = [offers]
        if not isinstance(offers, list):
            raise MarketplaceError("Vast.ai: POST /bundles/: expected {'offers': [...]}")
        return offers

    def create(self, spec: ImageSpec, template: dict[str, Any], offer_id: int, *, label: str,
               env: dict[str, str] | None = None) -> str:
        body = {
            "template_hash_id": template["hash_id"],
            "label": label,
            "disk": spec.runtime.container_disk_gb + spec.runtime.volume_disk_gb,
            "runtype": "args",
            "target_state": "running",
            "cancel_unavail": True,
        }
        if env:  # merged by key with the template's env (create-instance docs)
            body["env"] = dict(env)
        data = self.client.request("PUT", f"/asks/{offer_id}/", json_body=body)
        if self.client.dry_run:
            return "(dry-run)"
        if not isinstance(data, dict) or not data.get("success") or not data.get("new_contract"):
            msg = (data or {}).get("msg") or (data or {}).get("error") if isinstance(data, dict) else None
            raise MarketplaceError(f"Vast.ai: PUT /asks/{offer_id}/: offer not rented ({msg or 'no new_contract'})")
        return str(data["new_contract"])

    def status(self, instance_id: str, spec: ImageSpec) -> Instance:
        data = self.client.request("GET", f"/instances/{instance_id}/")
        inst = (data or {}).get("instances") if isinstance(data, dict) else None
        if not isinstance(inst, dict):
            raise MarketplaceError(f"Vast.ai: GET /instances/{instance_id}/: expected {{'instances': {{...}}}}")
        actual = str(inst.get("actual_status") or "provisioning")
        state = "running" if actual == "running" else ("failed" if actual in FAILED else "starting")
        ip = inst.get("public_ipaddr")
        ports = inst.get("ports") or {}
        urls: dict[str, str] = {}
        for p in spec.runtime.ports:
            proto = "udp" if p.protocol == "udp" else "tcp"
            binding = ports.get(f"{p.port}/{proto}")
            if not ip or not binding:
                continue
            host_port = binding[0].get("HostPort") if isinstance(binding, list) and binding else None
            if not host_port:
                continue
            scheme = "http" if p.protocol == "http" else ("ssh" if p.port == 22 else proto)
            urls[p.name] = f"{scheme}://{str(ip).strip()}:{host_port}"
        if state == "running" and any(p.protocol == "http" for p in spec.runtime.ports) and not urls:
            state = "starting"  # running, but its ports are not published yet
        price = inst.get("dph_total")
        return Instance(id=instance_id, state=state, detail=actual, urls=urls, cost_per_hr=float(price) if price else None)

    def destroy(self, instance_id: str) -> None:
        self.client.request("DELETE", f"/instances/{instance_id}/")
