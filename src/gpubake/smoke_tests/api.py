"""Build a self-test from what a caller has (CLI flags, the service's settings).

Resolution order, the same for `gpubake selftest` and `gpubake serve`:
image facts: `gpubake.provisioning.facts.resolve` (--facts PATH, then --spec / --image on a
dev box or bare host, then the image's own /opt/gpubake/image.json);
model dir: --model-dir > $GPUBAKE_MODEL_DIR > the facts' model_dir (the spec's GPUBAKE_MODEL_DIR).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpubake import envs
from gpubake.provisioning.allocator import use_expandable_segments
from gpubake.provisioning.compile_cache import use_persistent_compile_cache
from gpubake.provisioning.facts import ImageFacts
from gpubake.provisioning.pipeline import check_runtime_env
from gpubake.smoke_tests.expectations import SelfTestError, load_table
from gpubake.smoke_tests.probe import GpuProbe, NvmlProbe
from gpubake.smoke_tests.report import Report
from gpubake.smoke_tests.runner import SelfTest
from gpubake.smoke_tests.stages import Context

_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


def resolve_model_dir(model_dir: str | Path | None, facts: ImageFacts) -> Path:
    found = model_dir or envs.raw("GPUBAKE_MODEL_DIR") or facts.model_dir
    if not found:
        raise SelfTestError("no model directory: pass --model-dir DIR or set GPUBAKE_MODEL_DIR")
    return Path(found)


def create_selftest(
    facts: ImageFacts,
    model_dir: Path,
    out_dir: Path,
    *,
    quick: bool = False,
    sustained: int = 1,
    device: str | None = None,
    table_path: str | Path | None = None,
    probe: GpuProbe | None = None,
    kernel_check: Callable[[str], dict[str, Any]] | None = None,
    pipeline_loader: Callable[[Path, str], Any] | None = None,
    on_update: Callable[[Report], None] | None = None,
    limits: dict[str, float] | None = None,
) -> SelfTest:
    """A ready-to-run SelfTest; bad options raise SelfTestError naming the flag."""
    if sustained < 1:
        raise SelfTestError(f"--sustained: must be at least 1, got {sustained}")
    if device is not None and not _DEVICE.match(device):
        raise SelfTestError(f"--device: must be cpu, cuda or cuda:N, got {device!r}")
    check_runtime_env()  # a bad $GPUBAKE_RUNTIME is bad input, not a failed render after the hashing
    compile_cache = use_persistent_compile_cache()  # before anything compiles
    alloc_conf = use_expandable_segments()  # before the first CUDA allocation (the kernel check's)
    ctx = Context(
        facts=facts,
        model_dir=Path(model_dir),
        out_dir=Path(out_dir),
        probe=probe or NvmlProbe(),
        table=load_table(table_path),
        quick=quick,
        sustained=sustained,
        device_override=device,
        kernel_check=kernel_check,
        pipeline_loader=pipeline_loader,
        compile_cache=compile_cache,
        cuda_alloc_conf=alloc_conf,
    )
    report = Report(
        image=facts.name,
        model_id=facts.model.id,
        options={"quick": quick, "sustained": sustained, "device": device, "model_dir": str(model_dir)},
    )
    return SelfTest(ctx, report, on_update=on_update, limits=limits)
