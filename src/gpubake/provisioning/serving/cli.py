"""`gpubake serve`: the generation service (self-test first, then one worker per GPU, or
one group of GPUs per clip with --gpus-per-clip)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Optional

import typer

from gpubake.console import console
from gpubake.errors import GpubakeError


def resolve_host(host: str, port: int) -> tuple[int, tuple]:
    """(address family, socket address) of `host`, or a one-line error naming --host."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise GpubakeError(f"--host {host!r}: not an IP address or a host name this machine resolves ({why})") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a busy port or a foreign address is a one-line
    error naming the flag (uvicorn would log a traceback-free 'error' and exit 1)."""
    family, addr = resolve_host(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GpubakeError(f"--port {port}: {host}:{port} is already in use (another service listens there)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise GpubakeError(f"--host {host}: not an address of this machine") from None
        if exc.errno == errno.EACCES:
            raise GpubakeError(f"--port {port}: permission denied (ports below 1024 need root)") from None
        raise GpubakeError(f"--host {host} --port {port}: cannot listen ({exc.strerror})") from None
    return sock


def serve(
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (not loopback: needs $GPUBAKE_API_KEY or --insecure-no-auth)."),
    port: int = typer.Option(8000, "--port", help="TCP port (1-65535)."),
    facts: Optional[Path] = typer.Option(None, "--facts", help="The image's facts (default: $GPUBAKE_IMAGE_FACTS, else /opt/gpubake/image.json)."),
    image: Optional[str] = typer.Option(None, "--image", help="Dev box / bare host: derive the facts from this catalog image (default: $GPUBAKE_IMAGE)."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Dev box / bare host: derive the facts from this spec TOML."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Checkpoint directory (default: $GPUBAKE_MODEL_DIR)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Self-test report JSON (default: $GPUBAKE_REPORT, else /workspace/gpubake/selftest.json)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", "--output-dir", help="Job records (SQLite) and videos (default: $GPUBAKE_DATA_DIR, else beside the report)."),
    selftest: bool = typer.Option(True, "--selftest/--no-selftest", help="Run the self-test before serving; without it the model files are checked against their manifest (hashes once, then by size and mtime) and a report already at --report still gates generation."),
    quick: bool = typer.Option(False, "--quick", help="Self-test hashes a sample of the large model files."),
    device: Optional[str] = typer.Option(None, "--device", help="Force cpu, cuda or cuda:N."),
    workers: str = typer.Option("auto", "--workers", help="Workers, each rendering one clip at a time on its own device: auto (one per GPU torch sees, CUDA_VISIBLE_DEVICES honoured; one on a CPU) or a number (with --device cpu: that many CPU workers)."),
    gpus_per_clip: Optional[str] = typer.Option(None, "--gpus-per-clip", help="GPUs that render ONE clip together (diffusers' context parallelism, one process per GPU; default: $GPUBAKE_GPUS_PER_CLIP, else 1: one clip per GPU). N must divide the GPUs torch sees; with --device cpu, N CPU processes. --workers then counts groups."),
    max_queue: int = typer.Option(16, "--max-queue", help="Jobs waiting at most (>= 1); more get 429."),
    keep_hours: float = typer.Option(24.0, "--keep-hours", help="Finished jobs and their videos are removed after this many hours."),
    keep_gb: float = typer.Option(20.0, "--keep-gb", help="At most this many GB of videos are kept; the oldest go first."),
    max_pixel_frames: Optional[int] = typer.Option(None, "--max-pixel-frames", help="Largest width x height x frames a request may ask (default: what fits this GPU's memory; on the CPU 256x256x17)."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve without an API key on a non-loopback address: anyone reaching the port can queue jobs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve the settings, print them, serve nothing."),
) -> None:
    """Serve video generation over HTTP: /health, /v1/generate, /v1/jobs/{id} and its /video."""
    from gpubake.provisioning.serving.auth import api_key_from_env, check_exposure
    from gpubake.provisioning.serving.build import build_service

    if not 1 <= port <= 65535:
        raise GpubakeError(f"--port: must be 1-65535, got {port}")
    if max_queue < 1:
        raise GpubakeError(f"--max-queue: must be at least 1, got {max_queue}")
    if keep_hours <= 0 or keep_gb <= 0:
        raise GpubakeError(f"--keep-hours and --keep-gb: must be > 0, got {keep_hours} and {keep_gb}")
    if max_pixel_frames is not None and max_pixel_frames < 16 * 16:
        raise GpubakeError(f"--max-pixel-frames: must be at least 256 (one 16x16 frame), got {max_pixel_frames}")
    resolve_host(host, port)
    if workers != "auto" and not (workers.isdigit() and int(workers) >= 1):
        raise GpubakeError(f"--workers: auto or a number >= 1, got {workers!r}")
    if gpus_per_clip is not None:
        if not (gpus_per_clip.isdigit() and int(gpus_per_clip) >= 1):
            raise GpubakeError(f"--gpus-per-clip: a whole number >= 1, got {gpus_per_clip!r}")
        per_clip = int(gpus_per_clip)
    else:
        from gpubake import envs

        per_clip = envs.GPUBAKE_GPUS_PER_CLIP
    key = api_key_from_env()
    service = build_service(facts_path=facts, image=image, spec_path=spec, model_dir=model_dir, report_path=report,
                            data_dir=data_dir, selftest=selftest, quick=quick, device=device,
                            max_queue=max_queue, keep_seconds=keep_hours * 3600, keep_bytes=int(keep_gb * 1e9),
                            max_pixel_frames=max_pixel_frames, workers=workers if workers == "auto" else int(workers), gpus_per_clip=per_clip)
    check_exposure(host, key, insecure_no_auth)
    auth = "API key required" if key else ("OPEN: no API key (--insecure-no-auth)" if insecure_no_auth
                                           else "open: no API key, loopback only")
    pool = f"{len(service.workers)} worker(s): " + ", ".join(w.device or "auto" for w in service.workers)
    if per_clip > 1:  # groups: each renders one clip across its devices
        pool = (f"{len(service.workers)} group(s) of {per_clip}, one clip split {service.split}: "  # type: ignore[attr-defined]
                + "; ".join(",".join(w.devices) for w in service.workers))  # type: ignore[attr-defined]
    console.print(f"serving {service.model.id} on http://{host}:{port} (report {service.report_path}, "
                  f"data under {service.data_dir}, self-test {'on' if selftest else 'off'}, {auth}; "
                  f"{pool})", markup=False)
    if dry_run:
        return
    sock = bind(host, port)
    import uvicorn

    from gpubake.provisioning.serving.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=key), log_level="info", access_log=True))
    server.run(sockets=[sock])
