"""The pipeline the serving image runs: the checkpoint's weights plus the measured
runtime plan of this GPU architecture (`gpubake.provisioning.runtime`, issue 7).

One function for the boot self-test and the generation service, so the clip the
self-test times is rendered by exactly the model the service then serves.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpubake.provisioning.models import EXPERTS, experts_of  # no torch: the CLI's fast paths stay fast

if TYPE_CHECKING:  # runtime imports torch: keep `gpubake --help` and the CLI's bad-input path fast
    from gpubake.provisioning.runtime import RuntimePlan

log = logging.getLogger(__name__)

PipelineLoader = Callable[[Path, str], Any]
# One load at a time per process: diffusers/transformers build modules on the meta device
# through process-wide patches (accelerate's init_empty_weights), so two workers loading at
# once break each other ("Cannot copy out of meta tensor"). Rendering needs no lock.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ServingPipeline:
    """A loaded pipeline and the runtime levers applied to it."""

    pipe: Any
    plan: RuntimePlan
    applied: dict[str, dict[str, int]]  # per expert, what `apply_runtime` did
    # the 8-bit attention kernels the plan tried on this device, and the checks of the fused
    # passes its levers turn on (runtime.attention_checks, runtime.FUSED_KERNELS)
    attention_checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # per expert, {NVFP4 GEMM backend: layers} as bound to its layers (`linear.bound_backends`)
    gemm_backends: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # seconds per phase of the load (loader.load_phases) and of applying the plan
    load_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def runtime(self) -> dict[str, Any]:
        """The plan, what was applied, the attention checks, the GEMM backend each expert's
        NVFP4 layers run and where the load's time went, as the self-test report shows them."""
        return {"plan": dataclasses.asdict(self.plan), "applied": self.applied,
                "attention_checks": self.attention_checks, "gemm_backends": self.gemm_backends,
                "load_seconds": self.load_seconds}


def check_runtime_env() -> None:
    """Parse $GPUBAKE_RUNTIME now, so a typo fails at startup in one line rather than
    after minutes of hashing weights. Parsing does not depend on the device (only the
    base plan does), so the CPU is used: no CUDA initialisation here. A
    $GPUBAKE_NVFP4_BACKEND (or $GPUBAKE_FP8_BACKEND) naming no backend fails here too; whether the GPU can run the
    one it names, the plan of the real device says (`load_serving_pipeline`)."""
    from gpubake.kernels.backends import default_backend_name, override_name
    from gpubake.kernels.fp8_linear import select_fp8_backend
    from gpubake.provisioning.runtime import plan_from_env

    override_name()
    select_fp8_backend("cpu")  # every path runs on the CPU: this checks the $GPUBAKE_FP8_BACKEND name only
    plan_from_env("cpu", gemm_backend=default_backend_name(None))


def load_serving_pipeline(model_dir: Path, device: str, loader: PipelineLoader | None = None) -> ServingPipeline:
    """Load the checkpoint at `model_dir` onto `device` with `loader` (default:
    `load_pipeline`), then apply the runtime plan of `device` from $GPUBAKE_RUNTIME.

    The plan is resolved before any weight is read, so a bad value costs no load time.
    Levers such as regional compile act lazily: the first denoising step of each new
    shape pays the compile, which the self-test's warm-up render absorbs."""
    from gpubake.provisioning.runtime import apply_runtime, attention_checks, plan_from_env

    model_id, levers = model_runtime(Path(model_dir))
    plan = plan_from_env(device, model_levers=levers, model_id=model_id)
    if loader is None:
        from gpubake.provisioning.loader import load_pipeline

        host = (("text_encoder",) if plan.text_encoder == "shrink" else ()) + \
            (EXPERTS if plan.expert_offload else ())

        def loader(path: Path, dev: str) -> Any:
            return load_pipeline(path, dev, host_components=host, require_manifest=True)
    from gpubake.provisioning.loader import load_phases

    with _LOAD_LOCK:
        pipe = loader(Path(model_dir), device)
        t0 = time.perf_counter()
        applied = apply_runtime(pipe, plan, device=device)
        phases = {**load_phases(pipe), "apply_runtime": round(time.perf_counter() - t0, 3)}
    log.info("runtime plan on %s: %s; applied %s", device, plan, applied)
    return ServingPipeline(pipe, plan, applied, attention_checks(device), gemm_backends(pipe), phases)


def model_runtime(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    """The checkpoint's model id (its manifest's) and that model's own runtime levers per
    architecture family (the registry's ``runtime``; none for a model it does not know)."""
    from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest
    from gpubake.provisioning.models import ModelError, get_model

    if not (model_dir / MANIFEST_NAME).is_file():
        return None, {}
    mid = read_manifest(model_dir).get("model_id")
    try:
        return mid, dict(get_model(mid).runtime) if mid else {}
    except ModelError:
        return mid, {}


FP8_PREFIX = "fp8:"  # FP8-weight paths in `gemm_backends` ("dequant-bf16" is a name of both kinds)


def gemm_backends(pipe: Any) -> dict[str, dict[str, int]]:
    """Per expert of `pipe`, {backend name: NVFP4 layers bound to it} and {"fp8:<path>": FP8
    layers bound to it} ({} for a BF16 expert)."""
    from gpubake.kernels.fp8_linear import bound_fp8_backends
    from gpubake.kernels.linear import bound_backends

    return {n: {**bound_backends(m), **{FP8_PREFIX + k: v for k, v in bound_fp8_backends(m).items()}}
            for n, m in experts_of(pipe).items()}
