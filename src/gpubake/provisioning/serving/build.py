"""Assemble a GenerationService from settings (shared by `gpubake serve` and the
RunPod serverless handler): image facts, model dir, report path, data dir, optional self-test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpubake import envs
from gpubake.provisioning.facts import ImageFacts, resolve
from gpubake.provisioning.pipeline import (
    PipelineLoader,
    check_runtime_env,
    load_serving_pipeline,
)
from gpubake.provisioning.serving.service import GenerationService


def default_data_dir(report_path: Path) -> Path:
    """$GPUBAKE_DATA_DIR, else $GPUBAKE_OUTPUT_DIR (its older name, which start.sh sets),
    else beside the report (under /workspace on marketplaces)."""
    env = envs.raw("GPUBAKE_DATA_DIR") or envs.raw("GPUBAKE_OUTPUT_DIR")
    return Path(env) if env else report_path.parent


def build_service(
    *,
    facts: ImageFacts | None = None,
    facts_path: str | Path | None = None,
    image: str | None = None,
    spec_path: str | Path | None = None,
    model_dir: str | Path | None = None,
    report_path: Path | None = None,
    data_dir: Path | None = None,
    selftest: bool = True,
    quick: bool = False,
    device: str | None = None,
    max_queue: int = 16,
    keep_seconds: float | None = None,
    keep_bytes: int | None = None,
    max_pixel_frames: int | None = None,
    pipeline_loader: PipelineLoader | None = None,
    **selftest_kwargs: Any,
) -> GenerationService:
    """The service; its pipeline is `load_serving_pipeline`'s (weights + runtime plan),
    loaded by the self-test when there is one. `pipeline_loader` replaces only the
    weight loading (tests). The image's facts: `facts`, else `facts.resolve(facts_path,
    image=image, spec=spec_path)`."""
    from gpubake.provisioning.models import model_for
    from gpubake.smoke_tests.api import create_selftest, resolve_model_dir
    from gpubake.smoke_tests.report import default_report_path

    image_facts = facts or resolve(facts_path, image=image, spec=spec_path)
    mdir = resolve_model_dir(model_dir, image_facts)
    report_path = report_path or default_report_path()
    data = data_dir or default_data_dir(report_path)
    test = None
    loader = None
    if selftest:
        # the self-test loads the pipeline (runtime plan applied) and hands it over
        test = create_selftest(image_facts, mdir, report_path.parent / "selftest-clip", quick=quick, device=device,
                               pipeline_loader=pipeline_loader, **selftest_kwargs)
    else:
        check_runtime_env()  # fail at startup, not in the worker thread after the load

        def loader() -> tuple[Any, str]:
            import torch

            dev = device or ("cuda" if image_facts.cuda != "none" and torch.cuda.is_available() else "cpu")
            return load_serving_pipeline(mdir, dev, pipeline_loader).pipe, dev

    extra: dict[str, Any] = {}
    if keep_seconds is not None:
        extra["keep_seconds"] = keep_seconds
    if keep_bytes is not None:
        extra["keep_bytes"] = keep_bytes
    return GenerationService(model=model_for(image_facts.model.id, image_facts.model.recipe), data_dir=data, report_path=report_path,
                             selftest=test, pipeline_loader=loader, model_dir=None if selftest else mdir,
                             max_queue=max_queue, max_pixel_frames=max_pixel_frames, **extra)
