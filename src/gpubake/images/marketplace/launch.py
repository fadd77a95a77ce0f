"""publish, launch, destroy: the marketplace workflows behind the CLI commands.

`launch` rents one GPU, waits for the instance, then polls the image's `GET /health`
(the boot self-test report, `gpubake.smoke_tests.report`) until the verdict is in. An
instance never outlives a failure silently: a failed self-test, a timeout or an error
after the rental either tears it down (`--destroy-on-fail`) or says how to.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from gpubake import envs
from gpubake.console import console
from gpubake.errors import GpubakeError
from gpubake.images.marketplace import config as mconfig
from gpubake.images.marketplace.http import ApiClient, MarketplaceError
from gpubake.images.marketplace.instance import Instance
from gpubake.images.marketplace.offers import (
    DEFAULT_MIN_RELIABILITY,
    OfferPolicy,
    check_gpu_for_spec,
    resolve_gpu,
)
from gpubake.images.marketplace.payload import is_digest_ref, template_name, template_payload
from gpubake.images.marketplace.runpod import RunPod
from gpubake.images.marketplace.vastai import Vast
from gpubake.smoke_tests.report import IN_PROGRESS, WAIT_EXIT_CODES, WORKSPACE_REPORT, Report, ReportError

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

EXIT_CODES = WAIT_EXIT_CODES  # `gpubake selftest`'s, plus 4 for no verdict in time


def market(client: ApiClient, target: str) -> RunPod | Vast:
    return RunPod(client) if target == "runpod" else Vast(client)


# ------------------------------------------------------------------ publish


def registry_auth_for(target: str, flag: str | None, cfg: dict[str, Any]) -> str | None:
    """The registry auth reference: `--registry-auth`, else the config file."""
    if flag:
        return flag
    key = "registry_auth_id" if target == "runpod" else "registry"
    value = mconfig.section(target, cfg).get(key)
    return str(value) if value else None


def publish(
    spec: ImageSpec, target: str, image_ref: str | None, *, dry_run: bool = False, registry_auth: str | None = None,
    cfg: dict[str, Any] | None = None, env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], ApiClient]:
    """Create or update the template named `gpubake-<image>`; returns (result, client)."""
    from gpubake.images.spec import check_pinned

    check_pinned(spec)  # an image whose model revision is a placeholder is not published
    env = dict(os.environ) if env is None else env
    t = mconfig.target(target)
    if not image_ref:
        raise GpubakeError("--image-ref: required: the pushed image pinned by digest (REPO@sha256:...; see `build-image --push --json`)")
    if not is_digest_ref(image_ref):
        raise GpubakeError(f"--image-ref: must be pinned by digest (...@sha256:<64 hex>), got {image_ref!r}")
    cfg = mconfig.load_config() if cfg is None else cfg
    auth = registry_auth_for(target, registry_auth, cfg)
    payload = template_payload(spec, target, image_ref, registry_auth=auth)
    secrets: list[str] = []
    if target == "vastai" and auth:
        # Vast.ai keeps the registry login in the template itself; it is sent, never rendered or shown.
        user, password = envs.raw("GPUBAKE_REGISTRY_USER", env), envs.raw("GPUBAKE_REGISTRY_PASSWORD", env)
        if not (user and password):
            raise GpubakeError(
                f"--registry-auth: Vast.ai needs the login for {auth}: set GPUBAKE_REGISTRY_USER and GPUBAKE_REGISTRY_PASSWORD"
            )
        payload["docker_login_user"], payload["docker_login_pass"] = user, password
        secrets.append(password)
    client = mconfig.make_client(t, dry_run=dry_run, config=cfg, extra_secrets=secrets)
    result = market(client, target).publish(payload)
    result.update({"target": target, "image": spec.name, "name": payload["name"], "image_ref": image_ref, "dry_run": dry_run})
    return result, client


# ------------------------------------------------------------------ health


def report_of(body: dict[str, Any] | None) -> Report | None:
    """The self-test report inside a `/health` body (`{"status", "verdict", "selftest": {...}}`),
    or the body itself when it is a bare report (as fetched over SSH); None before there is one.
    A report of another schema is a `ReportError`."""
    if not isinstance(body, dict):
        return None
    inner = body.get("selftest")
    if inner is None and "schema_version" not in body:
        return None  # a /health body before the self-test's first update
    return Report.from_json(inner if inner is not None else body, where="self-test report")


def report_state(report: Report | None, body: dict[str, Any] | None = None) -> str:
    """in_progress | pass | degraded | fail, from the report and the `/health` body around it."""
    if report is not None and report.final_verdict:
        return report.outcome
    if isinstance(body, dict) and body.get("status") == "failed":  # the service gave up before a verdict
        return "fail"
    return IN_PROGRESS


def read_health(session: requests.Session, url: str, timeout: tuple[float, float] = (5.0, 10.0)) -> dict[str, Any] | None:
    """The report at `url`, or None while the service is not answering yet.

    /health answers 503 with the report once the self-test has failed, so any status with a
    JSON report body counts; connection errors and proxies' 502/504 mean "not up yet".
    """
    try:
        resp = session.get(url, timeout=timeout, headers={"Accept": "application/json"})
    except requests.exceptions.RequestException:
        return None
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) and ("verdict" in data or "selftest" in data or "status" in data) else None


# ------------------------------------------------------------------ launch


@dataclass
class LaunchOptions:
    gpu: str
    max_price: float | None = None
    cloud: str | None = None  # RunPod: SECURE | COMMUNITY (default: config, else SECURE)
    min_reliability: float | None = None  # Vast.ai (default: config, else 0.98)
    destroy_on_fail: bool = False
    timeout: float = 1800.0
    poll_interval: float = 10.0
    dry_run: bool = False
    ssh_key: Path | None = None  # read the report over SSH (its .pub goes to the instance as PUBLIC_KEY)
    report_path: str = str(WORKSPACE_REPORT)  # where the start script writes it
    ssh_user: str = "root"
    api_key: str | None = field(default=None, repr=False)  # the service's, set by `launch` itself


def service_api_key(environ: Mapping[str, str]) -> tuple[str, bool]:
    """(the key the rented service will require, whether it was generated here):
    $GPUBAKE_API_KEY (checked as the service checks it), else a new random one (the image
    refuses to serve a public port without one)."""
    from gpubake.provisioning.serving.auth import api_key_from_env

    given = api_key_from_env(environ)
    return (given, False) if given else (secrets.token_urlsafe(32), True)


def _template(mk: RunPod | Vast, spec: ImageSpec, target: str, dry_run: bool) -> dict[str, Any]:
    name = template_name(spec)
    tpl = mk.find_template(name)
    if tpl is None and dry_run:
        return {"id": "<template id>", "hash_id": "<template hash_id>", "imageName": "<image from template>", "ports": []}
    if tpl is None:
        raise GpubakeError(f"--image: no {target} template {name!r} yet; run `gpubake publish --target {target} --image {spec.name}` first")
    return tpl


def launch(spec: ImageSpec, target: str, opts: LaunchOptions, *, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rent, wait, read the self-test verdict; returns the result object printed by `--json`."""
    t = mconfig.target(target)
    if target not in spec.targets:
        raise GpubakeError(f"--target: image {spec.name!r} is not built for {target} (targets: {', '.join(spec.targets)})")
    if opts.timeout <= 0 or opts.poll_interval <= 0:
        raise GpubakeError("--timeout and --poll-interval must be > 0 seconds")
    cfg = mconfig.load_config() if cfg is None else cfg
    section = mconfig.section(target, cfg)
    env: dict[str, str] = {}
    if opts.ssh_key is not None:
        pub = Path(f"{opts.ssh_key}.pub")
        if not Path(opts.ssh_key).is_file() or not pub.is_file():
            raise GpubakeError(f"--ssh-key: need the private key and its .pub beside it: {opts.ssh_key}")
        env["PUBLIC_KEY"] = pub.read_text(encoding="utf-8").strip()
    api_key, generated = service_api_key(os.environ)
    env["GPUBAKE_API_KEY"] = api_key  # the instance's env (never argv, a template or a file)
    opts = replace(opts, api_key=api_key)
    gpu = resolve_gpu(opts.gpu, target)
    check_gpu_for_spec(gpu, spec)
    client = mconfig.make_client(t, dry_run=opts.dry_run, config=cfg)
    client.extra_secrets.append(api_key)  # *** in --dry-run output and in every error message
    mk = market(client, target)
    tpl = _template(mk, spec, target, opts.dry_run)
    label = f"gpubake-{spec.name}-{int(time.time())}"
    result: dict[str, Any] = {"target": target, "image": spec.name, "gpu": gpu.market_id, "dry_run": opts.dry_run}

    if isinstance(mk, Vast):
        min_rel = opts.min_reliability
        if min_rel is None:
            min_rel = float(section.get("min_reliability", DEFAULT_MIN_RELIABILITY))
        policy = OfferPolicy.for_spec(spec, gpu, max_price=opts.max_price, min_reliability=min_rel)
        offers = mk.search_offers(policy)
        if opts.dry_run and not offers:
            offer: dict[str, Any] = {"id": "<offer id>"}
        else:
            offer, skipped = policy.pick(offers)
            if skipped:
                console.print(f"skipped {len(skipped)} offer(s), e.g. #{skipped[0][0]}: {skipped[0][1]}", markup=False)
        result["offer"] = {k: offer.get(k) for k in ("id", "dph_total", "driver_version", "cuda_max_good", "reliability2", "geolocation") if k in offer}
        if not opts.dry_run:
            console.print(f"renting Vast.ai offer #{offer['id']} ({gpu.name}, ${float(offer.get('dph_total') or 0):.3f}/h)", markup=False)
        instance_id = mk.create(spec, tpl, offer["id"], label=label, env=env)
        info: dict[str, Any] = {"cost_per_hr": offer.get("dph_total")}
    else:
        cloud = str(opts.cloud or section.get("cloud") or "SECURE").upper()
        instance_id, info = mk.create(spec, tpl, gpu, cloud=cloud, label=label, env=env)
    result["instance_id"] = instance_id
    result.update({k: v for k, v in info.items() if k not in result})
    if opts.dry_run:
        result["requests"] = [p.to_dict() for p in client.planned]
        return result

    try:
        price = info.get("cost_per_hr")
        if opts.max_price is not None and price is not None and float(price) > opts.max_price:
            mk.destroy(instance_id)
            result["destroyed"] = True
            raise GpubakeError(
                f"--max-price: {target} rented {gpu.name} at ${float(price):.3f}/h > ${opts.max_price}/h; instance {instance_id} destroyed"
            )
        console.print(f"{t.title} instance {instance_id} created; waiting for its self-test", markup=False)
        if generated:  # shown once, here, to the user's terminal; not in --json, not logged
            console.print(f"service API key (generated; shown once, keep it): {api_key}", markup=False,
                          soft_wrap=True)  # never wrapped: the key must copy in one piece
        else:
            console.print("service API key: yours, from $GPUBAKE_API_KEY", markup=False)
        outcome = _wait_for_verdict(mk, instance_id, spec, opts)
    except BaseException:
        if not result.get("destroyed"):
            _teardown_or_tell(mk, target, instance_id, opts.destroy_on_fail)
        raise
    result.update(outcome)
    result["destroyed"] = False
    if result["verdict"] in ("fail", "timeout"):
        if opts.destroy_on_fail:
            mk.destroy(instance_id)
            result["destroyed"] = True
            console.print(f"self-test {result['verdict']}: instance {instance_id} destroyed (--destroy-on-fail)", markup=False)
        else:
            console.print(f"instance {instance_id} is still running: `gpubake destroy --target {target} {instance_id}`", markup=False)
    return result


def _teardown_or_tell(mk: RunPod | Vast, target: str, instance_id: str, destroy: bool) -> None:
    if destroy:
        try:
            mk.destroy(instance_id)
            console.print(f"instance {instance_id} destroyed (--destroy-on-fail)", markup=False)
            return
        except MarketplaceError as exc:
            console.print(f"could not destroy instance {instance_id}: {exc}", markup=False)
    console.print(f"instance {instance_id} may still be running: `gpubake destroy --target {target} {instance_id}`", markup=False)


def _wait_for_verdict(mk: RunPod | Vast, instance_id: str, spec: ImageSpec, opts: LaunchOptions) -> dict[str, Any]:
    """Poll the instance, then its /health (or its report file over SSH), until a verdict or the deadline."""
    with tempfile.TemporaryDirectory(prefix="gpubake-launch-") as tmp:
        # A fresh instance's host key is new by definition: trust it on first use, then hold
        # it to that key for the rest of this launch (not beyond: marketplaces reuse IPs).
        known_hosts = Path(tmp) / "known_hosts"
        return _poll(mk, instance_id, spec, opts, known_hosts)


def _poll(mk: RunPod | Vast, instance_id: str, spec: ImageSpec, opts: LaunchOptions, known_hosts: Path) -> dict[str, Any]:
    start = time.monotonic()
    deadline = start + opts.timeout
    health = requests.Session()  # no retries, no marketplace key: it talks to the rented machine
    if opts.api_key:  # the service's own key: /health shows the full report only with it
        health.headers["Authorization"] = f"Bearer {opts.api_key}"
    body: dict[str, Any] | None = None  # what the instance last answered: a /health body or the report file
    report: Report | None = None
    last = ""
    with console.status("waiting for the instance") as status:
        while True:
            inst = mk.status(instance_id, spec)
            if inst.state == "failed":
                return _outcome("fail", inst, body, report, start, reason=f"instance {inst.detail}")
            now = f"instance {inst.detail}"
            if inst.state == "running":
                try:
                    if opts.ssh_key is not None:
                        report, now = _ssh_report(inst, opts, known_hosts)
                        body = report.to_dict() if report else None
                    elif inst.health_url():
                        body = read_health(health, inst.health_url() or "")
                        report = report_of(body)
                        now = "waiting for /health"
                except ReportError as exc:  # the image writes a report this gpubake cannot read
                    return _outcome("fail", inst, body, None, start, reason=str(exc))
                state = report_state(report, body)
                if state != IN_PROGRESS:
                    return _outcome(state, inst, body, report, start)
                if body:
                    now = f"self-test {state.replace('_', ' ')}"
            if now != last:
                status.update(now)
                last = now
            if time.monotonic() + opts.poll_interval > deadline:
                return _outcome("timeout", inst, body, report, start,
                                reason=f"no verdict within {opts.timeout:g} s ({last})")
            time.sleep(opts.poll_interval)


def _ssh_report(inst: Instance, opts: LaunchOptions, known_hosts: Path) -> tuple[Report | None, str]:
    """(report or None, what we are waiting for) read over SSH from the instance."""
    from gpubake.images.marketplace import remote

    addr = inst.ssh_address()
    if addr is None:
        return None, "waiting for the SSH port"
    target = remote.SshTarget(opts.ssh_user, addr[0], addr[1], opts.ssh_key, known_hosts, accept_new=True)
    try:
        report = remote.read_report(target, opts.report_path)
    except remote.RemoteError as exc:
        if "host key CHANGED" in str(exc):
            raise
        return None, f"waiting for SSH ({exc})"
    return report, ("waiting for " + opts.report_path) if report is None else ""


def _outcome(verdict: str, inst: Instance, body: dict[str, Any] | None, report: Report | None, start: float,
             reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "verdict": verdict,
        "throughput": report.throughput() if report else None,
        "urls": dict(inst.urls),
        "health_url": inst.health_url(),
        "instance_state": inst.detail,
        "seconds": round(time.monotonic() - start, 2),
        "report": body,
    }
    if inst.cost_per_hr is not None:
        out["cost_per_hr"] = inst.cost_per_hr
    if reason:
        out["reason"] = reason
    return out


# ------------------------------------------------------------------ destroy


def destroy(target: str, instance_id: str, *, dry_run: bool = False, cfg: dict[str, Any] | None = None) -> tuple[dict[str, Any], ApiClient]:
    t = mconfig.target(target)
    if not instance_id.strip() or "/" in instance_id:
        raise GpubakeError(f"ID: not an instance id: {instance_id!r}")
    client = mconfig.make_client(t, dry_run=dry_run, config=cfg)
    market(client, target).destroy(instance_id)
    return {"target": target, "instance_id": instance_id, "destroyed": not dry_run, "dry_run": dry_run}, client
