"""`gpubake serve`: the generation service (self-test first, then one GPU worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpubake.console import console


def serve(
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port (1-65535)."),
    facts: Optional[Path] = typer.Option(None, "--facts", help="The image's facts (default: $GPUBAKE_IMAGE_FACTS, else /opt/gpubake/image.json)."),
    image: Optional[str] = typer.Option(None, "--image", help="Dev box / bare host: derive the facts from this catalog image (default: $GPUBAKE_IMAGE)."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Dev box / bare host: derive the facts from this spec TOML."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Checkpoint directory (default: $GPUBAKE_MODEL_DIR)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Self-test report JSON (default: $GPUBAKE_REPORT, else /workspace/gpubake/selftest.json)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Where job videos go (default: $GPUBAKE_OUTPUT_DIR, else beside the report)."),
    selftest: bool = typer.Option(True, "--selftest/--no-selftest", help="Run the self-test before serving; without it, a report already at --report still gates generation."),
    quick: bool = typer.Option(False, "--quick", help="Self-test hashes a sample of the large model files."),
    device: Optional[str] = typer.Option(None, "--device", help="Force cpu, cuda or cuda:N."),
    max_queue: int = typer.Option(16, "--max-queue", help="Jobs waiting at most (>= 1); more get 429."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve the settings, print them, serve nothing."),
) -> None:
    """Serve video generation over HTTP: /health, /v1/generate, /v1/jobs/{id} and its /video."""
    from gpubake.errors import GpubakeError
    from gpubake.provisioning.serving.build import build_service

    if not 1 <= port <= 65535:
        raise GpubakeError(f"--port: must be 1-65535, got {port}")
    if max_queue < 1:
        raise GpubakeError(f"--max-queue: must be at least 1, got {max_queue}")
    service = build_service(facts_path=facts, image=image, spec_path=spec, model_dir=model_dir, report_path=report,
                            output_dir=output_dir, selftest=selftest, quick=quick, device=device,
                            max_queue=max_queue)
    console.print(f"serving {service.model.id} on http://{host}:{port} (report {service.report_path}, "
                  f"videos under {service.out_dir}, self-test {'on' if selftest else 'off'})", markup=False)
    if dry_run:
        return
    import uvicorn

    from gpubake.provisioning.serving.app import create_app

    uvicorn.run(create_app(service), host=host, port=port, log_level="info", access_log=True)
