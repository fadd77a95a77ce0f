"""Assemble a GenerationService from settings (shared by `gpubake serve` and the
RunPod serverless handler): image facts, model dir, report path, data dir, optional self-test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpubake import envs
from gpubake.errors import GpubakeError
from gpubake.provisioning.allocator import use_expandable_segments
from gpubake.provisioning.facts import ImageFacts, resolve
from gpubake.provisioning.pipeline import (
    PipelineLoader,
    check_runtime_env,
    load_serving_pipeline,
)
from gpubake.provisioning.serving.service import WORKER_STAGES_SKIPPED, GenerationService
from gpubake.provisioning.serving.service import on_device as _on_device


class WorkersError(GpubakeError):
    """--workers asks for more workers than this machine has devices, or a bad value."""


def worker_devices(workers: int | str, device: str | None, gpu_image: bool) -> list[str | None]:
    """One device per worker. `workers` "auto": one per GPU torch sees (CUDA_VISIBLE_DEVICES
    honoured), one on a CPU; an int N: N workers, on cuda:0..N-1, or on the CPU with
    ``--device cpu`` (tests: N pipelines in one process). One worker keeps `device` as
    given (None: the self-test's GPU stage picks cuda or cpu)."""
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise WorkersError(f"--workers: auto or a number >= 1, got {workers!r}")
    if device == "cpu":
        return ["cpu"] * (1 if workers == "auto" else int(workers))
    if device is not None and device.startswith("cuda:"):
        if workers not in ("auto", 1):
            raise WorkersError(f"--workers {workers} with --device {device}: one device, one worker "
                               "(leave --device out to put one worker on each GPU)")
        return [device]
    count = 0
    if gpu_image and workers != 1:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = max(1, count) if workers == "auto" else int(workers)
    if n == 1:
        return [device]
    if n > count:
        seen = f"torch sees {count} GPU(s) here" if gpu_image else "a CPU-only image uses no GPU"
        raise WorkersError(f"--workers {n}: {seen}; pass --device cpu for CPU workers")
    return [f"cuda:{i}" for i in range(n)]


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
    workers: int | str = 1,
    gpus_per_clip: int = 1,
    **selftest_kwargs: Any,
) -> GenerationService:
    """The service; each worker's pipeline is `load_serving_pipeline`'s (weights + runtime
    plan) on its device, loaded by its self-test when there is one. `workers`: see
    `worker_devices`. `pipeline_loader` replaces only the weight loading (tests). The
    image's facts: `facts`, else `facts.resolve(facts_path, image=image, spec=spec_path)`."""
    from gpubake.provisioning.models import model_for
    from gpubake.smoke_tests.api import create_selftest, resolve_model_dir
    from gpubake.smoke_tests.probe import DeviceProbe, NvmlProbe
    from gpubake.smoke_tests.report import default_report_path

    use_expandable_segments()  # before any worker allocates on a GPU (with or without a self-test)
    image_facts = facts or resolve(facts_path, image=image, spec=spec_path)
    mdir = resolve_model_dir(model_dir, image_facts)
    report_path = report_path or default_report_path()
    data = data_dir or default_data_dir(report_path)
    model = model_for(image_facts.model.id, image_facts.model.recipe)
    extra: dict[str, Any] = {}
    if keep_seconds is not None:
        extra["keep_seconds"] = keep_seconds
    if keep_bytes is not None:
        extra["keep_bytes"] = keep_bytes
    if gpus_per_clip != 1:
        from gpubake.provisioning.serving.groups import GroupService, check_split, group_devices, model_heads

        groups = group_devices(gpus_per_clip, workers, device, image_facts.cuda != "none")
        split = check_split(gpus_per_clip, model_heads(mdir))
        service = GroupService(groups=groups, facts=image_facts, model_dir=mdir, selftest=selftest, quick=quick,
                               selftest_kwargs=selftest_kwargs, group_pipeline_loader=pipeline_loader,
                               model=model, data_dir=data, report_path=report_path, max_queue=max_queue,
                               max_pixel_frames=max_pixel_frames, split=split, **extra)
        return service
    devices = worker_devices(workers, device, image_facts.cuda != "none")
    tests: list[Any] = []
    loader = None
    if selftest:
        # each worker's self-test loads its pipeline (runtime plan applied) and hands it over
        base_probe = selftest_kwargs.pop("probe", None) or NvmlProbe()
        for i, dev in enumerate(devices):
            pool_gpu = len(devices) > 1 and dev is not None and dev.startswith("cuda:")
            probe = DeviceProbe(base_probe, int(dev.split(":")[1])) if pool_gpu else base_probe
            clip = report_path.parent / ("selftest-clip" if i == 0 else f"selftest-clip-{i}")
            test = create_selftest(image_facts, mdir, clip, quick=quick, device=dev, probe=probe,
                                   pipeline_loader=pipeline_loader, **selftest_kwargs)
            if i > 0:
                test.stages = tuple(s for s in test.stages if s.name not in WORKER_STAGES_SKIPPED)
            if pool_gpu:
                test.stages = tuple(_on_device(s, dev) for s in test.stages)
            tests.append(test)
    else:
        check_runtime_env()  # fail at startup, not in the worker thread after the load

        def loader(dev: str | None) -> tuple[Any, str]:
            import torch

            dev = dev or ("cuda" if image_facts.cuda != "none" and torch.cuda.is_available() else "cpu")
            return load_serving_pipeline(mdir, dev, pipeline_loader).pipe, dev

    return GenerationService(model=model, data_dir=data, report_path=report_path,
                             selftests=tests or None, devices=devices, pipeline_loader=loader,
                             model_dir=None if selftest else mdir, max_queue=max_queue,
                             max_pixel_frames=max_pixel_frames, **extra)
