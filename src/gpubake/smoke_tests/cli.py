"""`gpubake selftest`: the boot self-test as a command (stages, verdict, report file)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpubake.console import console, emit_json


def selftest(
    facts: Optional[Path] = typer.Option(
        None, "--facts", help="The image's facts (default: $GPUBAKE_IMAGE_FACTS, else /opt/gpubake/image.json)."
    ),
    image: Optional[str] = typer.Option(
        None, "--image", help="Dev box / bare host: derive the facts from this catalog image (default: $GPUBAKE_IMAGE)."
    ),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Dev box / bare host: derive the facts from this spec TOML."),
    model_dir: Optional[Path] = typer.Option(
        None, "--model-dir", help="Baked checkpoint directory (default: $GPUBAKE_MODEL_DIR, else the image's)."
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Report JSON path (default: $GPUBAKE_REPORT, else /workspace/gpubake/selftest.json)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Hash a sample of the large model files instead of all."),
    sustained: int = typer.Option(1, "--sustained", metavar="N", help="Render N times and report the spread."),
    device: Optional[str] = typer.Option(None, "--device", help="Force cpu, cuda or cuda:N (default: from the GPU stage)."),
    table: Optional[Path] = typer.Option(None, "--table", help="Expected-throughput table JSON (default: packaged)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
) -> None:
    """Check this machine: GPU, NVFP4 kernels, model files, a render, throughput.

    Exit code: 0 pass, 1 degraded, 3 fail (2: bad input). The report is written
    atomically at every stage, so a reader sees the run in progress, then the verdict.
    What the image is comes from its image.json; --image/--spec derive the same facts
    from a spec, where gpubake's build side is installed.
    """
    from gpubake.provisioning.facts import resolve
    from gpubake.smoke_tests.api import create_selftest, resolve_model_dir
    from gpubake.smoke_tests.report import Report, default_report_path

    image_facts = resolve(facts, image=image, spec=spec)
    mdir = resolve_model_dir(model_dir, image_facts)
    report_path = report or default_report_path()
    out_dir = report_path.parent / "selftest-clip"

    with console.status("self-test starting") as status:

        def on_update(rep: Report) -> None:
            rep.write(report_path)
            if rep.state == "running":
                done = ", ".join(f"{s.name} {s.status}" for s in rep.stages)
                status.update(f"self-test: {done or 'starting'}")

        test = create_selftest(
            image_facts, mdir, out_dir, quick=quick, sustained=sustained, device=device, table_path=table,
            on_update=on_update,
        )
        result = test.run()
    console.print(result.summary(), markup=False, soft_wrap=True)
    console.print(f"report: {report_path}", markup=False)
    if json_out:
        emit_json(result.to_dict())
    raise typer.Exit(result.exit_code)
