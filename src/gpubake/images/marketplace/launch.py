"""publish, launch, destroy: the marketplace workflows behind the CLI commands.

`launch` rents one GPU, follows the instance through its phases (scheduled, pulling,
booting, self-test, ready: `phases.py`), and decides "ready" from the image's own
`GET /health`, read with the service's API key (`GPUBAKE_API_KEY`) and parsed as a self-test
report (`gpubake.smoke_tests.report`), never from the platform's status. An instance never
outlives a failure silently: a failed self-test, a timeout or an error after the rental
either tears it down (`--destroy-on-fail`) or says how to.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
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
from gpubake.images.marketplace.payload import (
    API_KEY_VAR,
    VAST_ENV_VALUE_MAX,
    is_digest_ref,
    runpod_payload,
    secret_of,
    template_name,
    template_payload,
)
from gpubake.images.marketplace.phases import Timeline
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


@dataclass
class ServerlessOptions:
    """`publish --serverless` (RunPod): a queue endpoint running the image's RunPod handler."""

    gpus: list[str] = field(default_factory=list)  # --gpu; default: gpubake's GPU table for gpu_archs
    max_workers: int = 1
    idle_timeout: int = 5  # seconds an idle worker stays up (billed)
    flashboot: bool = True
    job_timeout: int = 600  # seconds one job may run

    def check(self) -> None:
        if self.max_workers < 1:
            raise GpubakeError(f"--max-workers: must be >= 1, got {self.max_workers}")
        if not 1 <= self.idle_timeout <= 3600:
            raise GpubakeError(f"--idle-timeout: must be 1..3600 seconds, got {self.idle_timeout}")
        if self.job_timeout < 1:
            raise GpubakeError(f"--job-timeout: must be >= 1 second, got {self.job_timeout}")


def publish(
    spec: ImageSpec, target: str, image_ref: str | None, *, dry_run: bool = False, registry_auth: str | None = None,
    cfg: dict[str, Any] | None = None, env: dict[str, str] | None = None, serverless: ServerlessOptions | None = None,
    api_key_secret: str | None = None,
) -> tuple[dict[str, Any], ApiClient]:
    """Create or update the template named `gpubake-<image>`; returns (result, client).

    With `serverless` (RunPod): the serverless template `gpubake-<image>-serverless` and
    the endpoint `gpubake-<image>` created from it instead. With `api_key_secret` (RunPod):
    the template's `GPUBAKE_API_KEY` is a reference to that RunPod secret, which the user
    creates in RunPod's console; the key itself is never sent."""
    from gpubake.images.spec import check_pinned

    check_pinned(spec)  # an image whose model revision is a placeholder is not published
    env = dict(os.environ) if env is None else env
    t = mconfig.target(target)
    if serverless is not None and target != "runpod":
        raise GpubakeError("--serverless: RunPod only (Vast.ai rents instances, it has no serverless endpoints)")
    if not image_ref:
        raise GpubakeError("--image-ref: required: the pushed image pinned by digest (REPO@sha256:...; see `build-image --push --json`)")
    if not is_digest_ref(image_ref):
        raise GpubakeError(f"--image-ref: must be pinned by digest (...@sha256:<64 hex>), got {image_ref!r}")
    cfg = mconfig.load_config() if cfg is None else cfg
    auth = registry_auth_for(target, registry_auth, cfg)
    payload = template_payload(spec, target, image_ref, registry_auth=auth, api_key_secret=api_key_secret)
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
    if serverless is not None:
        serverless.check()
        payload = runpod_payload(spec, image_ref, registry_auth=auth, serverless=True, api_key_secret=api_key_secret)
        if envs.raw("GPUBAKE_API_KEY", env):
            secrets.append(envs.raw("GPUBAKE_API_KEY", env))
    gpus = [resolve_gpu(name, "runpod") for name in (serverless.gpus if serverless else [])]
    for gpu in gpus:
        check_gpu_for_spec(gpu, spec)  # its architecture and memory
    client = mconfig.make_client(t, dry_run=dry_run, config=cfg, extra_secrets=secrets)
    mk = market(client, target)
    gpu_block = mk.serverless_gpus(spec, gpus) if isinstance(mk, RunPod) and serverless else None  # read before any write
    result = mk.publish(payload)
    result.update({"target": target, "image": spec.name, "name": payload["name"], "image_ref": image_ref, "dry_run": dry_run})
    if serverless is not None and gpu_block is not None:
        assert isinstance(mk, RunPod)
        result = _publish_endpoint(mk, spec, payload, result, serverless, gpu_block, env)
    return result, client


def _publish_endpoint(mk: RunPod, spec: ImageSpec, payload: dict[str, Any], tpl_result: dict[str, Any],
                      opts: ServerlessOptions, gpu_block: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The endpoint half of `publish --serverless`: created from the serverless template just published."""
    body: dict[str, Any] = {
        "name": template_name(spec),
        "templateId": str(tpl_result.get("id") or "<template id>"),
        "type": "QUEUE",  # the image's handler takes jobs from RunPod's queue (runpod.serverless.start)
        "gpu": gpu_block,
        "workers": {"min": 0, "max": opts.max_workers, "idleTimeout": opts.idle_timeout},
        "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
        "flashboot": "FLASHBOOT" if opts.flashboot else "OFF",
        "timeout": opts.job_timeout * 1000,
    }
    key = envs.raw("GPUBAKE_API_KEY", env)
    if key and secret_of(payload["env"].get("GPUBAKE_API_KEY")) is None:
        # the service key, sent at publish time only: never in the template file (with
        # --api-key-secret the serverless template refers to the secret instead)
        body["env"] = {"GPUBAKE_API_KEY": key}
    ep = mk.publish_endpoint(body, payload)
    return {**tpl_result, "template": {k: tpl_result[k] for k in ("action", "id", "changed", "name")},
            "action": ep["action"], "id": ep["id"], "changed": ep["changed"], "endpoint": body["name"],
            "url": ep.get("url"), "serverless": True}


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


class ServiceAuthError(GpubakeError):
    """The instance's service refused the API key gpubake gave it."""


def read_health(session: requests.Session, url: str, api_key: str | None = None,
                timeout: tuple[float, float] = (5.0, 10.0)) -> dict[str, Any] | None:
    """The `/health` body at `url`, or None while the service is not answering yet.

    Sent with the service's API key (`Authorization: Bearer`): without it the service
    gives liveness and verdict only, not the report. /health answers 503 with the report
    once the self-test has failed, so any status with a JSON health body counts;
    connection errors and proxies' 502/504 mean "not up yet"; 401/403 mean the service
    does not take our key (`ServiceAuthError`).
    """
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        resp = session.get(url, timeout=timeout, headers=headers)
    except requests.exceptions.RequestException:
        return None
    if resp.status_code in (401, 403):
        raise ServiceAuthError(f"{url}: the service refused GPUBAKE_API_KEY (HTTP {resp.status_code})")
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
    start_timeout: float | None = None  # scheduled + pulling may take this long (default: timeout)
    poll_interval: float = 10.0
    dry_run: bool = False
    ssh_key: Path | None = None  # read the report over SSH (its .pub goes to the instance as SSH_PUBLIC_KEY)
    report_path: str = str(WORKSPACE_REPORT)  # where the start script writes it
    ssh_user: str = "root"
    api_key: str | None = field(default=None, repr=False)  # the service's, set by `launch` itself


def _template(mk: RunPod | Vast, spec: ImageSpec, target: str, dry_run: bool) -> dict[str, Any]:
    name = template_name(spec)
    tpl = mk.find_template(name)
    if tpl is None and dry_run:
        return {"id": "<template id>", "hash_id": "<template hash_id>", "image": "<image from template>", "ports": []}
    if tpl is None:
        raise GpubakeError(f"--image: no {target} template {name!r} yet; run `gpubake publish --target {target} --image {spec.name}` first")
    return tpl


def _key_secret(template: dict[str, Any]) -> str | None:
    """The RunPod secret the template's GPUBAKE_API_KEY refers to (`publish --api-key-secret`):
    then the pod gets its key from RunPod and launch sends none (the pod's env would win)."""
    variables = template.get("env")  # the template's, as RunPod stores it (not this process's)
    return secret_of(variables.get(API_KEY_VAR)) if isinstance(variables, dict) else None


def service_key(env: dict[str, str] | None = None) -> tuple[str, bool]:
    """(the service's API key, whether it was generated): the user's `GPUBAKE_API_KEY`,
    checked by the service's own rule (`serving.auth`), else a new random one (the image
    refuses to serve a public port without one)."""
    from gpubake.provisioning.serving.auth import api_key_from_env

    given = api_key_from_env(env)
    return (given, False) if given else (secrets.token_urlsafe(32), True)


def launch(spec: ImageSpec, target: str, opts: LaunchOptions, *, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rent, follow the phases, read the self-test verdict; returns the result object printed by `--json`."""
    t = mconfig.target(target)
    if target not in spec.targets:
        raise GpubakeError(f"--target: image {spec.name!r} is not built for {target} (targets: {', '.join(spec.targets)})")
    if opts.timeout <= 0 or opts.poll_interval <= 0 or (opts.start_timeout is not None and opts.start_timeout <= 0):
        raise GpubakeError("--timeout, --start-timeout and --poll-interval must be > 0 seconds")
    cfg = mconfig.load_config() if cfg is None else cfg
    section = mconfig.section(target, cfg)
    env: dict[str, str] = {}
    attach_key: str | None = None
    if opts.ssh_key is not None:
        pub = Path(f"{opts.ssh_key}.pub")
        if not Path(opts.ssh_key).is_file() or not pub.is_file():
            raise GpubakeError(f"--ssh-key: need the private key and its .pub beside it: {opts.ssh_key}")
        key_text = pub.read_text(encoding="utf-8").strip()
        if target == "vastai" and len(key_text) > VAST_ENV_VALUE_MAX:
            # over Vast.ai's env value limit (an RSA-4096 key): attached through its API after the rent
            attach_key = key_text
        else:
            # SSH_PUBLIC_KEY, not PUBLIC_KEY: RunPod fills PUBLIC_KEY with the account's keys
            # unless the request sets it, and the start script authorizes both
            env["SSH_PUBLIC_KEY"] = key_text
    api_key: str | None
    api_key, generated = service_key()
    gpu = resolve_gpu(opts.gpu, target)
    check_gpu_for_spec(gpu, spec)  # its architecture and memory (gpubake's table; the marketplace's own figure below)
    client = mconfig.make_client(t, dry_run=opts.dry_run, config=cfg, extra_secrets=[api_key])
    mk = market(client, target)
    tpl = _template(mk, spec, target, opts.dry_run)
    secret = _key_secret(tpl) if target == "runpod" else None
    if secret is None:
        env["GPUBAKE_API_KEY"] = api_key
    elif generated:  # the pod takes its key from the secret, whose value only the user knows
        if opts.ssh_key is None:
            raise GpubakeError(
                f"GPUBAKE_API_KEY: template {template_name(spec)!r} takes the service's key from the RunPod secret "
                f"{secret!r}; set GPUBAKE_API_KEY to its value (launch reads /health with it), or read the report with --ssh-key")
        api_key, generated = None, False
    # unique per launch: the name is how an ambiguous create is found again
    label = f"gpubake-{spec.name}-{int(time.time())}-{secrets.token_hex(3)}"
    result: dict[str, Any] = {"target": target, "image": spec.name, "gpu": gpu.market_id, "label": label, "dry_run": opts.dry_run}
    if spec.min_gpu_memory_gb is not None:
        result["min_gpu_memory_gb"] = spec.min_gpu_memory_gb
    if secret:
        result["api_key_secret"] = secret  # the name, never the value

    if isinstance(mk, Vast):
        min_rel = opts.min_reliability
        if min_rel is None:
            min_rel = float(section.get("min_reliability", DEFAULT_MIN_RELIABILITY))
        policy = OfferPolicy.for_spec(spec, gpu, max_price=opts.max_price, min_reliability=min_rel)
        instance_id, offer = mk.rent(spec, tpl, policy, label=label, env=env)  # search, pick, create (vastai.py)
        if attach_key is not None:
            try:
                mk.attach_ssh_key(instance_id, attach_key)
            except BaseException:
                if not opts.dry_run:
                    _teardown_or_tell(mk, target, instance_id, opts.destroy_on_fail)
                raise
        result["offer"] = {k: offer.get(k) for k in ("id", "dph_total", "driver_version", "cuda_max_good", "reliability2", "gpu_ram", "geolocation") if k in offer}
        created_at = time.monotonic()  # the instance exists from here (rent searched, then created)
        info: dict[str, Any] = {"cost_per_hr": offer.get("dph_total")}
    else:
        cloud = str(opts.cloud or section.get("cloud") or "SECURE").upper()
        gpu = mk.check_gpu(gpu, spec, cloud=cloud, max_price=opts.max_price)
        result["gpu"] = gpu.market_id
        created_at = time.monotonic()
        instance_id, info = mk.create(spec, tpl, gpu, cloud=cloud, label=label, env=env)
    result["instance_id"] = instance_id
    result.update({k: v for k, v in info.items() if k not in result})
    if opts.dry_run:
        result["requests"] = [p.to_dict() for p in client.planned]
        return result
    if generated:
        console.print(f"API key of the service on instance {instance_id} (GPUBAKE_API_KEY; shown once, not stored): {api_key}",
                      markup=False, highlight=False, soft_wrap=True)

    try:
        price = info.get("cost_per_hr")
        if opts.max_price is not None and price is not None and float(price) > opts.max_price:
            mk.destroy(instance_id)
            result["destroyed"] = True
            raise GpubakeError(
                f"--max-price: {target} rented {gpu.name} at ${float(price):.3f}/h > ${opts.max_price}/h; instance {instance_id} destroyed"
            )
        console.print(f"{t.title} instance {instance_id} created; waiting for its self-test", markup=False)
        outcome = _wait_for_verdict(mk, instance_id, spec, opts, api_key, created_at)
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


def _wait_for_verdict(mk: RunPod | Vast, instance_id: str, spec: ImageSpec, opts: LaunchOptions, api_key: str | None,
                      created_at: float) -> dict[str, Any]:
    """Poll the instance, then its /health (or its report file over SSH), until a verdict or a deadline."""
    with tempfile.TemporaryDirectory(prefix="gpubake-launch-") as tmp:
        # A fresh instance's host key is new by definition: trust it on first use, then hold
        # it to that key for the rest of this launch (not beyond: marketplaces reuse IPs).
        known_hosts = Path(tmp) / "known_hosts"
        return _poll(mk, instance_id, spec, opts, known_hosts, api_key, created_at)


def _service_phase(body: dict[str, Any] | None, state: str) -> str:
    """The launch phase once the container runs, from what /health said."""
    if body is None:
        return "booting"
    if state in ("pass", "degraded"):
        return "ready"
    if state == "fail":
        return "failed"
    return "self-test"


def _poll(mk: RunPod | Vast, instance_id: str, spec: ImageSpec, opts: LaunchOptions, known_hosts: Path, api_key: str | None,
          created_at: float) -> dict[str, Any]:
    timeline = Timeline(created_at)
    timeline.enter("scheduled", now=created_at)
    deadline = created_at + opts.timeout
    start_deadline = created_at + (opts.start_timeout if opts.start_timeout is not None else opts.timeout)
    health = requests.Session()  # no retries, not the marketplace's key: it talks to the rented machine
    body: dict[str, Any] | None = None  # what the instance last answered: a /health body or the report file
    report: Report | None = None

    def finish(verdict: str, inst: Instance, reason: str | None = None) -> dict[str, Any]:
        if verdict == "fail":
            timeline.enter("failed")
        timeline.close()
        out = _outcome(verdict, inst, body, report, created_at, reason=reason)
        out["phases"] = timeline.to_list()
        out["phase"] = timeline.current.name if timeline.current else None
        return out

    with console.status("creating") as status:
        while True:
            inst = mk.status(instance_id, spec)
            if inst.state == "failed":
                return finish("fail", inst, reason=f"instance {inst.detail}")
            state = IN_PROGRESS
            if inst.state == "running":
                try:
                    if opts.ssh_key is not None:
                        report, _ = _ssh_report(inst, opts, known_hosts)
                        body = report.to_dict() if report else None
                    elif inst.health_url():
                        body = read_health(health, inst.health_url() or "", api_key)
                        report = report_of(body)
                except (ReportError, ServiceAuthError) as exc:  # a report this gpubake cannot read, or a refused key
                    return finish("fail", inst, reason=str(exc))
                state = report_state(report, body)
                if state == IN_PROGRESS and body and body.get("verdict") in ("pass", "degraded", "fail") and report is None:
                    return finish("fail", inst, reason=f"/health gave the verdict {body['verdict']!r} without the report: "
                                                       "the service did not take GPUBAKE_API_KEY")
                phase = _service_phase(body, state)
            else:
                phase = inst.phase or "scheduled"
            ended = timeline.enter(phase, pulled=inst.pulled)
            if ended is not None:
                console.print(f"  {ended.name}: {ended.seconds(time.monotonic()):.1f} s", markup=False)
            if state != IN_PROGRESS:
                return finish(state, inst)
            status.update(timeline.describe())
            now = time.monotonic()
            if timeline.in_start() and now + opts.poll_interval > start_deadline:
                limit = opts.start_timeout if opts.start_timeout is not None else opts.timeout
                return finish("timeout", inst, reason=f"still {timeline.describe(now)} after {limit:g} s "
                                                          f"(the marketplace says: {inst.detail}): the instance never ran")
            if now + opts.poll_interval > deadline:
                return finish("timeout", inst, reason=f"no verdict within {opts.timeout:g} s ({timeline.describe(now)})")
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
