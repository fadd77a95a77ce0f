"""CLI: publish, launch, destroy, remote (selftest, provision), push-weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from gpubake.console import console, emit_json, transfer_progress
from gpubake.smoke_tests.report import WORKSPACE_REPORT

TARGET_HELP = "Marketplace: runpod or vastai."


def _spec(name: str):
    from gpubake.images import catalog

    return catalog.find(name)


def _setup_logging() -> None:
    """Library logs (urllib3 retries, paramiko) go through the redacting filter, on stderr."""
    from gpubake.secrets import RedactingFilter

    root = logging.getLogger("gpubake")
    if not any(isinstance(f, RedactingFilter) for f in root.filters):
        handler = logging.StreamHandler()
        handler.addFilter(RedactingFilter())
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.addFilter(RedactingFilter())
        root.setLevel(logging.WARNING)


def _print_plan(client: Any) -> None:
    for req in client.planned:
        tag = "(sent: read-only)" if req.sent else "(not sent: --dry-run)"
        console.print(f"[bold]{tag}[/]", markup=True)
        console.print(req.render(), markup=False, highlight=False, soft_wrap=True)


def publish_cmd(
    target: str = typer.Option(..., "--target", help=TARGET_HELP),
    image: str = typer.Option(..., "--image", help="Image name in the catalog (or a spec .toml path)."),
    image_ref: Optional[str] = typer.Option(None, "--image-ref", help="Pushed image pinned by digest: REPO@sha256:<64 hex>."),
    registry_auth: Optional[str] = typer.Option(
        None, "--registry-auth", help="RunPod: ID of registry credentials saved at RunPod. Vast.ai: private registry host."
    ),
    api_key_secret: Optional[str] = typer.Option(
        None, "--api-key-secret", metavar="NAME",
        help="RunPod: the template's GPUBAKE_API_KEY is the RunPod secret NAME ({{ RUNPOD_SECRET_NAME }}), "
             "created in RunPod's console; the key never enters the template.",
    ),
    serverless: bool = typer.Option(
        False, "--serverless", help="RunPod: publish a serverless endpoint (queue, the image's RunPod handler) instead of a pod template."
    ),
    gpus: Optional[list[str]] = typer.Option(
        None, "--gpu", help="--serverless: a GPU its workers may use (repeatable; default: every known GPU of the image's gpu_archs)."
    ),
    max_workers: int = typer.Option(1, "--max-workers", help="--serverless: most workers at once (min is 0: idle costs nothing)."),
    idle_timeout: int = typer.Option(5, "--idle-timeout", help="--serverless: seconds an idle worker stays up."),
    flashboot: bool = typer.Option(True, "--flashboot/--no-flashboot", help="--serverless: RunPod FlashBoot (faster cold starts)."),
    job_timeout: int = typer.Option(600, "--job-timeout", help="--serverless: seconds one job may run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the requests (secrets as ***) instead of sending writes."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
) -> None:
    """Create or update (by name) the marketplace template of an image, or its RunPod serverless endpoint."""
    from gpubake.errors import GpubakeError
    from gpubake.images.marketplace.launch import ServerlessOptions, publish

    _setup_logging()
    spec = _spec(image)
    opts = None
    if serverless:
        opts = ServerlessOptions(gpus=list(gpus or []), max_workers=max_workers, idle_timeout=idle_timeout,
                                 flashboot=flashboot, job_timeout=job_timeout)
    elif gpus:
        raise GpubakeError("--gpu: only with --serverless (launch picks the GPU of a pod)")
    result, client = publish(spec, target, image_ref, dry_run=dry_run, registry_auth=registry_auth, serverless=opts,
                             api_key_secret=api_key_secret)
    if dry_run:
        _print_plan(client)
        result["requests"] = [p.to_dict() for p in client.planned]

    def verb(action: str) -> str:
        return "would be created or updated" if dry_run and action != "unchanged" else action

    if opts is not None:
        tpl = result["template"]
        console.print(f"runpod serverless template {tpl['name']!r}: {verb(tpl['action'])}" + (f" (id {tpl['id']})" if tpl.get("id") else ""),
                      markup=False)
        console.print(f"runpod serverless endpoint {result['endpoint']!r}: {verb(result['action'])}"
                      + (f" (id {result['id']})" if result.get("id") else "") + (f"; jobs: {result['url']}" if result.get("url") else ""),
                      markup=False)
    else:
        console.print(f"{target} template {result['name']!r}: {verb(result['action'])}" + (f" (id {result['id']})" if result.get("id") else ""),
                      markup=False)
    if as_json:
        emit_json(result)


def launch_cmd(
    target: str = typer.Option(..., "--target", help=TARGET_HELP),
    image: str = typer.Option(..., "--image", help="Image name (its template must be published)."),
    gpu: str = typer.Option(..., "--gpu", help='GPU model, e.g. "RTX 5090", "H100 SXM", "L40S".'),
    max_price: Optional[float] = typer.Option(None, "--max-price", help="Highest price in $/hour."),
    cloud: Optional[str] = typer.Option(None, "--cloud", help="RunPod: SECURE or COMMUNITY (default SECURE)."),
    min_reliability: Optional[float] = typer.Option(None, "--min-reliability", help="Vast.ai: lowest host reliability (0..1, default 0.98)."),
    destroy_on_fail: bool = typer.Option(
        False, "--destroy-on-fail", help="Tear the instance down if its self-test fails, a deadline passes or an error follows the rental."
    ),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds to wait for the verdict."),
    start_timeout: Optional[float] = typer.Option(
        None, "--start-timeout", help="Seconds the instance may take to run (scheduled + image pull; default: --timeout)."
    ),
    poll_interval: float = typer.Option(10.0, "--poll-interval", help="Seconds between polls."),
    ssh_key: Optional[Path] = typer.Option(
        None, "--ssh-key", help="Read the self-test report over SSH with this key (its .pub is installed on the instance)."
    ),
    report_path: str = typer.Option(str(WORKSPACE_REPORT), "--report-path", help="Report file on the instance (with --ssh-key)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the requests instead of renting."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
) -> None:
    """Rent one GPU with the image, wait for its boot self-test, print verdict, throughput and URLs."""
    from gpubake.images.marketplace.launch import EXIT_CODES, LaunchOptions, launch

    _setup_logging()
    spec = _spec(image)
    opts = LaunchOptions(
        gpu=gpu, max_price=max_price, cloud=cloud, min_reliability=min_reliability, destroy_on_fail=destroy_on_fail,
        timeout=timeout, start_timeout=start_timeout, poll_interval=poll_interval, dry_run=dry_run, ssh_key=ssh_key,
        report_path=report_path,
    )
    result = launch(spec, target, opts)
    if dry_run:
        for req in result["requests"]:
            console.print(f"{req['method']} {req['url']}" + ("" if req["sent"] else "  (not sent: --dry-run)"), markup=False)
            if req["body"] is not None:
                console.print(json.dumps(req["body"], indent=2, sort_keys=True), markup=False, highlight=False)
    else:
        _print_launch(result)
    if as_json:
        emit_json({k: v for k, v in result.items()})
    code = 0 if dry_run else EXIT_CODES.get(result.get("verdict", "fail"), 3)
    if code:
        raise typer.Exit(code)


def _print_launch(result: dict[str, Any]) -> None:
    verdict = str(result.get("verdict", "?"))
    color = {"pass": "green", "degraded": "yellow"}.get(verdict, "red")
    console.print(f"[bold {color}]self-test {verdict.upper()}[/] on {result['target']} instance {result['instance_id']}", markup=True)
    if result.get("reason"):
        console.print(f"  reason: {result['reason']}", markup=False)
    tp = result.get("throughput")
    if tp:
        shown = ", ".join(f"{k}={v}" for k, v in tp.items() if k not in ("message",) and v is not None)
        console.print(f"  throughput: {shown}", markup=False)
    phases = result.get("phases") or []
    if phases:
        console.print("  phases: " + ", ".join(f"{p['phase']} {p['seconds']:.1f} s" for p in phases), markup=False)
    for name, url in (result.get("urls") or {}).items():
        console.print(f"  {name}: {url}", markup=False)
    if result.get("cost_per_hr") is not None:
        console.print(f"  price: ${float(result['cost_per_hr']):.3f}/h", markup=False)


def destroy_cmd(
    instance_id: str = typer.Argument(..., metavar="ID", help="Instance (RunPod pod id / Vast.ai instance id)."),
    target: str = typer.Option(..., "--target", help=TARGET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the request instead of sending it."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
) -> None:
    """Tear down an instance (irreversible: its disk is deleted)."""
    from gpubake.images.marketplace.launch import destroy

    _setup_logging()
    result, client = destroy(target, instance_id, dry_run=dry_run)
    if dry_run:
        _print_plan(client)
        result["requests"] = [p.to_dict() for p in client.planned]
    else:
        console.print(f"{target} instance {instance_id} destroyed", markup=False)
    if as_json:
        emit_json(result)


# ------------------------------------------------------------------ remote

remote_app = typer.Typer(help="Bare machines over SSH: provision gpubake, run the self-test, fetch its report.", no_args_is_help=True)

KEY_HELP = "Private key file (default: your SSH agent and ~/.ssh keys)."
HOSTKEY_HELP = "Trust and remember an unknown host key (default: refuse hosts not in known_hosts)."


@remote_app.command("selftest")
def remote_selftest_cmd(
    dest: str = typer.Argument(..., metavar="USER@HOST", help="SSH destination."),
    key: Optional[Path] = typer.Option(None, "--key", help=KEY_HELP),
    port: int = typer.Option(22, "--port", help="SSH port."),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)."),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help=HOSTKEY_HELP),
    gpubake: str = typer.Option("~/.gpubake/venv/bin/gpubake", "--gpubake", help="gpubake on the host (as `remote provision` installs it)."),
    quick: bool = typer.Option(False, "--quick", help="Sample the model's hashes instead of hashing it all."),
    image: Optional[str] = typer.Option(None, "--image", help="Image the host should pass as (default: the host's $GPUBAKE_IMAGE)."),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="Checkpoint directory on the host."),
    report: Optional[Path] = typer.Option(None, "--report", help="Where to write the fetched report (default ./selftest-HOST.json)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds the remote self-test may take."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
) -> None:
    """Run `gpubake selftest` on a host over SSH and fetch its report back."""
    from gpubake.images.marketplace import remote
    from gpubake.images.marketplace.launch import EXIT_CODES

    _setup_logging()
    target = remote.SshTarget.parse(dest, port=port, key=key, known_hosts=known_hosts, accept_new=accept_new_host_key)
    local = report or Path(f"selftest-{target.host}.json")
    result = remote.selftest(
        target, gpubake=gpubake, local_report=local, quick=quick, image=image, model_dir=model_dir, timeout=timeout
    )
    verdict = result["verdict"]
    color = {"pass": "green", "degraded": "yellow"}.get(verdict, "red")
    console.print(f"[bold {color}]self-test {verdict.upper()}[/] on {target.display}; report: {local}", markup=True)
    if result.get("summary"):
        console.print(result["summary"], markup=False, highlight=False)
    if as_json:
        emit_json(result)
    code = EXIT_CODES.get(verdict, 3)
    if code:
        raise typer.Exit(code)


@remote_app.command("provision")
def remote_provision_cmd(
    dest: str = typer.Argument(..., metavar="USER@HOST", help="SSH destination."),
    image: str = typer.Option(..., "--image", help="Image whose stack to install (catalog name or spec .toml path)."),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Checkpoint: s3://... or https://... (fetched and verified on the host) or a local "
        "directory (copied); default: the builder's cached checkpoint of the image."),
    weights_sha256: Optional[str] = typer.Option(
        None, "--weights-sha256", help="sha256 of the checkpoint's gpubake-manifest.json (default: the spec's model.sha256)."),
    key: Optional[Path] = typer.Option(None, "--key", help=KEY_HELP),
    port: int = typer.Option(22, "--port", help="SSH port."),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)."),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key", help=HOSTKEY_HELP),
    wheel: Optional[Path] = typer.Option(None, "--wheel", help="gpubake wheel to install (default: built from this checkout)."),
    venv: str = typer.Option("~/.gpubake/venv", "--venv", help="Virtualenv on the host (created if missing)."),
    python: str = typer.Option("python3", "--python", help="Python on the host that creates the venv (the lock's version)."),
    pip_args: str = typer.Option("", "--pip-args", help="Extra pip arguments, e.g. '--no-index --find-links /wheels'."),
    nvidia_smi: str = typer.Option("nvidia-smi", "--nvidia-smi", help="nvidia-smi on the host, if it is not on its PATH."),
    no_selftest: bool = typer.Option(False, "--no-selftest", help="Install only; do not run the self-test."),
    quick: bool = typer.Option(False, "--quick", help="Self-test: sample the model's hashes instead of hashing it all."),
    report: Optional[Path] = typer.Option(None, "--report", help="Where to write the fetched report (default ./selftest-HOST.json)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the remote commands instead of running them."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
) -> None:
    """Install an image's stack on a host over SSH (its lock with hashes, gpubake, the checkpoint), then self-test."""
    from gpubake.images.marketplace import provision, remote
    from gpubake.images.marketplace.launch import EXIT_CODES

    _setup_logging()
    spec = _spec(image)
    target = remote.SshTarget.parse(dest, port=port, key=key, known_hosts=known_hosts, accept_new=accept_new_host_key)
    result = provision.provision(
        target, spec, weights_source=weights, weights_sha256=weights_sha256, wheel=wheel, venv=venv, python=python,
        pip_args=pip_args, nvidia_smi=nvidia_smi, run_selftest=not no_selftest, quick=quick, local_report=report,
        dry_run=dry_run,
    )
    code = 0
    if dry_run:
        for cmd in result["commands"].values():
            console.print(cmd, markup=False, highlight=False)
    else:
        console.print(f"provisioned {target.display} with {spec.name}: {result['version']} in {result['venv']}, "
                      f"checkpoint {result['weights_action']}", markup=False)
        outcome = result.get("selftest")
        if outcome:
            verdict = outcome["verdict"]
            color = {"pass": "green", "degraded": "yellow"}.get(verdict, "red")
            console.print(f"[bold {color}]self-test {verdict.upper()}[/] on {target.display}; report: "
                          f"{outcome['report_path']}", markup=True)
            code = EXIT_CODES.get(verdict, 3)
    if as_json:
        emit_json(result)
    if code:
        raise typer.Exit(code)


# ------------------------------------------------------------------ push-weights


def push_weights_cmd(
    src: Path = typer.Argument(..., help="Checkpoint directory (e.g. the output of `gpubake quantize`)."),
    dest: str = typer.Argument(..., metavar="s3://BUCKET/PREFIX", help="Destination in any S3-compatible store."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="S3 endpoint (R2, B2, MinIO); default AWS_ENDPOINT_URL or AWS."),
    jobs: int = typer.Option(4, "--jobs", min=1, max=64, help="Parallel uploads."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
) -> None:
    """Upload a checkpoint to S3-compatible storage (its manifest last), for `fetch s3://...`."""
    from gpubake.provisioning import bake

    _setup_logging()
    plan = bake.upload_dir(src, dest, endpoint_url=endpoint_url, jobs=jobs, dry_run=True)
    if dry_run:
        for key in plan["keys"]:
            console.print(f"would upload s3://{bake.parse_s3_uri(dest).bucket}/{key}", markup=False)
        result = {**plan, "dry_run": True}
    else:
        with transfer_progress() as progress:
            task = progress.add_task(f"push {src.name}", total=plan["bytes"])
            result = bake.upload_dir(
                src, dest, endpoint_url=endpoint_url, jobs=jobs, progress=lambda n: progress.advance(task, n)
            )
        result["dry_run"] = False
        console.print(f"pushed {result['files']} files ({result['bytes']} bytes) to {result['uri']}", markup=False)
    if as_json:
        emit_json(result)
