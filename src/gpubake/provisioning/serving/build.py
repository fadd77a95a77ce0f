"""Assemble a GenerationService from settings (shared by `gpubake serve` and the
RunPod serverless handler): spec, model dir, report path, optional self-test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpubake.provisioning.serving.service import GenerationService


def default_output_dir(report_path: Path) -> Path:
    """$GPUBAKE_OUTPUT_DIR, else beside the report (under /workspace on marketplaces)."""
    env = os.environ.get("GPUBAKE_OUTPUT_DIR")
    return Path(env) if env else report_path.parent


def build_service(
    *,
    image: str | None = None,
    spec_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    report_path: Path | None = None,
    output_dir: Path | None = None,
    selftest: bool = True,
    quick: bool = False,
    device: str | None = None,
    max_queue: int = 16,
    **selftest_kwargs: Any,
) -> GenerationService:
    from gpubake.provisioning.models import get_model
    from gpubake.smoke_tests.api import create_selftest, resolve_model_dir, resolve_spec
    from gpubake.smoke_tests.report import default_report_path

    spec = resolve_spec(image, spec_path)
    mdir = resolve_model_dir(model_dir, spec)
    report_path = report_path or default_report_path()
    out = output_dir or default_output_dir(report_path)
    test = None
    loader = None
    if selftest:
        test = create_selftest(spec, mdir, report_path.parent / "selftest-clip", quick=quick, device=device,
                               **selftest_kwargs)
    else:
        def loader() -> tuple[Any, str]:
            import torch

            from gpubake.provisioning.loader import load_pipeline

            dev = device or ("cuda" if spec.cuda != "none" and torch.cuda.is_available() else "cpu")
            return load_pipeline(mdir, device=dev), dev

    return GenerationService(model=get_model(spec.model.id), out_dir=out, report_path=report_path,
                             selftest=test, pipeline_loader=loader, max_queue=max_queue)
