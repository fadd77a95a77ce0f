"""Vast.ai through its REST API (https://console.vast.ai/api/v0, bearer API key).

Endpoints used, as the vendor's OpenAPI document describes them (vendored:
`tests/contracts/openapi/vastai.yaml`, which the contract tests validate every call against):
- `GET /users/current/` (the account id, to find only our own templates)
- `GET /template/?select_filters=...&select_cols=["*"]` (search templates; every column,
  so publish compares what is stored), `POST /template/` (create), `PUT /template/` with
  `hash_id` (edit; the hash changes, the numeric id does not)
- `POST /bundles/` (search offers: `limit` and no cursor, so pages are price ranges),
  `PUT /asks/{offer_id}/` (create instance, returns `new_contract`),
  `GET /instances/{id}/` (`{"instances": {...}}`), `DELETE /instances/{id}/`
- `GET /api/v1/instances/?select_filters={"label": {"eq": ...}}` (find an instance by its
  label after a create that ended ambiguously; paged by `next_token`)
- `POST /instances/{id}/ssh/` (attachSshKey: `launch --ssh-key` with a public key longer
  than an env value may be, 256 characters: an RSA-4096 key is ~725)

No blind retry of a rental: an offer is rented once, so a second `PUT /asks/{id}/` after a
5xx answers `no_such_ask` while the first rental bills on. A create that ends ambiguously
(5xx, read timeout, dropped connection, a 200 without `new_contract`) is followed by a
lookup of the launch's unique label, which adopts the instance or shows there is none.

Ports of a running instance are published on the host's public address:
`ports["8000/tcp"][0]["HostPort"]` on `public_ipaddr`.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from gpubake.console import console
from gpubake.errors import GpubakeError
from gpubake.images.marketplace.http import ApiClient, MarketplaceError, NotFoundError
from gpubake.images.marketplace.instance import Instance
from gpubake.images.marketplace.offers import OfferPolicy, vast_disk_gb
from gpubake.images.marketplace.payload import VAST_ENV_TOTAL_MAX, VAST_ENV_VALUE_MAX, vast_env_flags

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

# Fields publish compares (the password is write-only at Vast.ai and never compared).
COMPARED = ("image", "env", "onstart", "runtype", "args_str", "use_ssh", "ssh_direct", "jup_direct",
            "recommended_disk_space", "desc", "readme", "extra_filters", "docker_login_repo", "docker_login_user",
            "private")
# "If actual_status becomes exited, unknown, or offline it will never reach running"
# (the document's info section).
FAILED = {"exited", "offline", "unknown"}
SSH_KEY_VARS = ("PUBLIC_KEY", "SSH_PUBLIC_KEY")
GONE = (404, 410)  # no_such_ask: the offer was rented by someone else or withdrawn


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


def create_env(env: dict[str, str] | None) -> str | None:
    """The create call's `env` string, within Vast.ai's limits (checked before renting)."""
    if not env:
        return None
    for key, value in env.items():
        if len(value) > VAST_ENV_VALUE_MAX:
            what = "--ssh-key: the public key" if key in SSH_KEY_VARS else f"env {key}"
            hint = " (an RSA-4096 key is ~725): use an ed25519 key" if key in SSH_KEY_VARS else ""
            raise GpubakeError(
                f"{what} is {len(value)} characters; Vast.ai refuses env values over {VAST_ENV_VALUE_MAX}{hint}")
    text = " ".join(vast_env_flags(env, where="env"))
    if len(text) > VAST_ENV_TOTAL_MAX:
        raise GpubakeError(f"env: {len(text)} characters in all; Vast.ai takes at most {VAST_ENV_TOTAL_MAX}")
    return text


class Vast:
    """The Vast.ai operations gpubake needs."""

    target = "vastai"
    page_size = 64  # offers per search page
    max_pages = 8  # price ranges searched before giving up on finding an acceptable offer
    rent_tries = 3  # offers tried in a row when the chosen one is gone (no_such_ask)
    lookup_tries = 3  # label lookups after an ambiguous create ...
    lookup_delay = 5.0  # ... this many seconds apart (a slow create may show up late)

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.v1 = self._v1_client(client)

    @staticmethod
    def _v1_client(client: ApiClient) -> ApiClient:
        """The same client on `/api/v1` (show instances lives there), sharing sessions and plan."""
        base = client.base_url.rstrip("/")
        if not base.endswith("/api/v0"):
            raise GpubakeError(f"GPUBAKE_VAST_API_URL: must end in /api/v0, got {base!r}")
        return dataclasses.replace(client, base_url=base[: -len("/api/v0")] + "/api/v1")

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
        params = {"select_filters": json.dumps(filters, sort_keys=True), "select_cols": json.dumps(["*"])}
        data = self.client.request("GET", "/template/", params=params)
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

    # ------------------------------------------------------------ offers
    def _search(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            data = self.client.request("POST", "/bundles/", json_body=body, read_only=True)
        except NotFoundError as exc:  # the document's answer to a bad key here is a 404
            if "invalid user key" in str(exc).lower():
                raise MarketplaceError(f"Vast.ai: API key rejected on POST /bundles/ ({exc}); {self.client.key_hint}",
                                       status=404) from None
            raise
        if self.client.dry_run and data is None:
            return []
        offers = (data or {}).get("offers") if isinstance(data, dict) else None
        if isinstance(offers, dict):  # a single offer comes back as an object
            offers = [offers]
        if not isinstance(offers, list):
            raise MarketplaceError("Vast.ai: POST /bundles/: expected {'offers': [...]}")
        return [o for o in offers if isinstance(o, dict)]

    def search_offers(self, policy: OfferPolicy) -> list[dict[str, Any]]:
        """Offers for the policy, cheapest first, page after page until one is acceptable.

        `/bundles/` takes a `limit` and has no cursor, so the next page is the same search
        priced from the last page's most expensive offer up (offers already seen dropped).
        """
        if not self.client.can_read():  # dry-run without a key: show the search, send nothing
            self.client.plan("POST", "/bundles/", policy.query(self.page_size))
            return []
        found: list[dict[str, Any]] = []
        seen: set[Any] = set()
        cheapest: float | None = None
        for _ in range(self.max_pages):
            page = self._search(policy.query(self.page_size, cheapest=cheapest))
            fresh = [o for o in page if o.get("id") not in seen]
            seen.update(o.get("id") for o in fresh)
            found.extend(fresh)
            if len(page) < self.page_size or not fresh or any(policy.rejects(o) is None for o in fresh):
                break
            cheapest = max(float(o.get("dph_total") or 0) for o in page)
        return found

    # ------------------------------------------------------------ instances
    def rent(self, spec: ImageSpec, template: dict[str, Any], policy: OfferPolicy, *, label: str,
             env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
        """Search, pick the cheapest acceptable offer and rent it: (instance id, offer).

        An offer rented by someone else between search and create (`no_such_ask`) is
        certain not to be ours: the next acceptable offer is tried, up to `rent_tries`.
        """
        env_text = create_env(env)  # refused before anything is searched or rented
        label = f"{label}-{secrets.token_hex(4)}"  # unique, so the lookup finds this launch's only
        offers = self.search_offers(policy)
        if self.client.dry_run and not offers:
            offer: dict[str, Any] = {"id": "<offer id>"}
            return self.create(spec, template, offer, label=label, env_text=env_text), offer
        last: MarketplaceError | None = None
        for _ in range(self.rent_tries):
            try:
                offer, skipped = policy.pick(offers)
            except GpubakeError:
                if last is None:
                    raise
                raise MarketplaceError(f"{last}; no other acceptable offer is left") from None
            if skipped and last is None:
                console.print(f"skipped {len(skipped)} offer(s), e.g. #{skipped[0][0]}: {skipped[0][1]}", markup=False)
            if not self.client.dry_run:
                console.print(f"renting Vast.ai offer #{offer['id']} ({policy.gpu.name}, "
                              f"${float(offer.get('dph_total') or 0):.3f}/h for {policy.min_disk_gb} GB)", markup=False)
            try:
                return self.create(spec, template, offer, label=label, env_text=env_text), offer
            except MarketplaceError as exc:
                if exc.status not in GONE or exc.uncertain:
                    raise
                console.print(f"offer #{offer['id']} is gone ({exc}); trying the next one", markup=False)
                last = exc
                offers = [o for o in offers if o.get("id") != offer.get("id")]
        assert last is not None
        raise MarketplaceError(f"{last}; {self.rent_tries} offers in a row were gone before renting")

    def create(self, spec: ImageSpec, template: dict[str, Any], offer: dict[str, Any], *, label: str,
               env_text: str | None = None) -> str:
        """Rent `offer`; the instance id. Never retried: an ambiguous end is settled by label."""
        body: dict[str, Any] = {
            "template_hash_id": template["hash_id"],
            "label": label,
            "disk": vast_disk_gb(spec),
            "runtype": "args",
            "target_state": "running",
            "cancel_unavail": True,
        }
        if env_text:  # merged by key with the template's env (create-instance docs)
            body["env"] = env_text
        path = f"/asks/{offer['id']}/"
        try:
            data = self.client.request("PUT", path, json_body=body, create=True)
        except MarketplaceError as exc:
            if not exc.uncertain:
                raise
            return self.settle(label, str(exc))
        if self.client.dry_run:
            return "(dry-run)"
        if isinstance(data, dict) and data.get("success") is False:
            msg = data.get("msg") or data.get("error")
            raise MarketplaceError(f"Vast.ai: PUT {path}: offer not rented ({msg or 'success: false'})")
        if not isinstance(data, dict) or not data.get("new_contract"):
            return self.settle(label, f"Vast.ai: PUT {path}: answered without new_contract")
        return str(data["new_contract"])

    def find_by_label(self, label: str) -> list[dict[str, Any]]:
        """The account's instances labelled exactly `label` (every page)."""
        params: dict[str, Any] = {"select_filters": json.dumps({"label": {"eq": label}}), "limit": 25}
        found: list[dict[str, Any]] = []
        for _ in range(100):  # 2,500 instances: far beyond one label
            data = self.v1.request("GET", "/instances/", params=params)
            rows = (data or {}).get("instances") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise MarketplaceError("Vast.ai: GET /api/v1/instances/: expected {'instances': [...]}")
            found.extend(r for r in rows if isinstance(r, dict) and r.get("label") == label)
            token = data.get("next_token")
            if not token:
                break
            params["after_token"] = token
        return found

    def settle(self, label: str, why: str) -> str:
        """After an ambiguous create: adopt the instance labelled `label`, or show there is none."""
        problem = ""
        for attempt in range(self.lookup_tries):
            if attempt:
                time.sleep(self.lookup_delay)
            try:
                found = self.find_by_label(label)
            except MarketplaceError as exc:
                problem = str(exc)
                continue
            problem = ""
            if found:
                found.sort(key=lambda r: int(r.get("id") or 0))
                keep, extra = found[-1], found[:-1]
                for row in extra:  # one launch rents one machine: any twin is destroyed
                    try:
                        self.destroy(str(row["id"]))
                    except MarketplaceError as exc:
                        console.print(f"could not destroy instance {row['id']}, also labelled {label}: {exc}", markup=False)
                console.print(f"the create ended ambiguously ({why}); adopted instance {keep['id']} "
                              f"labelled {label}", markup=False)
                return str(keep["id"])
        if problem:
            raise MarketplaceError(
                f"{why}; could not check for an instance labelled {label} ({problem}): see `vastai show instances` "
                "and `gpubake destroy --target vastai ID`")
        raise MarketplaceError(f"{why}; no instance labelled {label} after {self.lookup_tries} lookups: nothing rented")

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
        detail = actual
        if state != "running" and inst.get("status_msg"):  # e.g. the image pull's progress
            detail = f"{actual}: {' '.join(str(inst['status_msg']).split())[:120]}"
        price = inst.get("dph_total")
        # before it runs: "loading" is the image pull and the container's start; anything
        # else (null, "created", "scheduling") is a machine still being assigned
        phase = None if state == "running" else ("pulling" if actual == "loading" else "scheduled")
        return Instance(id=instance_id, state=state, detail=detail, urls=urls, cost_per_hr=float(price) if price else None,
                        phase=phase)

    def attach_ssh_key(self, instance_id: str, key: str) -> None:
        """Add a public key to the instance (attachSshKey), for a key too long for the env.

        Vast.ai writes the key to root's `~/.ssh/authorized_keys` in the container; the start
        script starts sshd when a key appears there, also after boot. Not a create: a retry
        attaches the same key again, which changes nothing."""
        shown = "<instance id>" if self.client.dry_run else instance_id
        path = f"/instances/{shown}/ssh/"
        data = self.client.request("POST", path, json_body={"ssh_key": key})
        if isinstance(data, dict) and data.get("success") is False:
            raise MarketplaceError(f"Vast.ai: POST {path}: key not attached ({data.get('msg') or data.get('error')})")

    def destroy(self, instance_id: str) -> None:
        self.client.request("DELETE", f"/instances/{instance_id}/")
