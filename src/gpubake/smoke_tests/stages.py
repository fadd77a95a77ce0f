"""The five measuring stages of the self-test. Each takes the shared `Context` and
returns a `StageResult`; none raises for a bad machine (that is a result, not an error).

Order and dependencies live in `runner.py`; what each stage decides lives here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake.errors import one_line
from gpubake.provisioning.facts import ImageFacts, arch_runs
from gpubake.smoke_tests.expectations import RenderParams, ThroughputTable, judge
from gpubake.smoke_tests.probe import HARMFUL_THROTTLE, GpuInfo, GpuProbe
from gpubake.smoke_tests.report import StageResult

_RANK = {"pass": 0, "skip": 0, "warn": 1, "fail": 2}


def worst(*statuses: str) -> str:
    return max(statuses, key=lambda s: _RANK[s]) if statuses else "pass"


@dataclass
class Context:
    """What the stages share: inputs, then what earlier stages found."""

    facts: ImageFacts  # the image's image.json
    model_dir: Path
    out_dir: Path
    probe: GpuProbe
    table: ThroughputTable
    quick: bool = False
    sustained: int = 1
    device_override: str | None = None
    kernel_check: Callable[[str], dict[str, Any]] | None = None
    pipeline_loader: Callable[[Path, str], Any] | None = None
    # filled in by the stages
    device: str = "cpu"
    mode: str = "cpu"  # "gpu" when stage 1 found GPUs this image uses (even if --device forces cpu)
    gpus: list[GpuInfo] = field(default_factory=list)
    pipeline: Any = None
    load_seconds: float | None = None
    runtime: dict[str, Any] | None = None  # ServingPipeline.runtime(): plan and levers applied
    renders: list[Any] = field(default_factory=list)  # provisioning.render.RenderResult
    warmup: Any = None
    prefetch: Any = None  # provisioning.prefetch.Prefetch, started with the run
    preimport: Any = None  # provisioning.preimport.Preimport, started before the model stage ($GPUBAKE_PREIMPORT)
    compile_cache: dict[str, str] = field(default_factory=dict)  # where inductor and Triton cache
    cuda_alloc_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF as the self-test set it (provisioning.allocator)

    @property
    def model_id(self) -> str:
        return self.facts.model.id

    @property
    def table_key(self) -> str:
        """The image's rows in the throughput table."""
        return self.facts.throughput_key

    @property
    def gpu_name(self) -> str | None:
        return self.gpus[0].name if self.gpus and self.mode == "gpu" else None


# ------------------------------------------------------------------------- 1. GPU


def _driver_check(gpu: GpuInfo, facts: ImageFacts) -> tuple[str, str]:
    req, cuda = facts.min_driver, facts.cuda
    if req is None:  # ImageFacts refuses a CUDA image without one; only a hand-made object gets here
        return "fail", f"image facts name CUDA {cuda} but no minimum driver"
    if req.satisfied_by(gpu.driver_version):
        return "pass", f"driver {gpu.driver_version} >= {req.toolkit} (CUDA {cuda})"
    if req.satisfied_by(gpu.driver_version, allow_minor_compat=True):
        return "warn", (
            f"driver {gpu.driver_version} < {req.toolkit} for CUDA {cuda}: runs only under minor-version "
            "compatibility (no PTX JIT of newer code)"
        )
    return "fail", f"driver {gpu.driver_version} too old: CUDA {cuda} needs >= {req.toolkit}"


def _arch_check(gpu: GpuInfo, archs: list[str]) -> tuple[str, str]:
    if gpu.arch in archs:
        return "pass", gpu.arch
    if archs and arch_runs(gpu.arch, list(archs), []):
        return "pass", f"{gpu.arch} (runs the image's {', '.join(archs)} code)"
    return "fail", f"wrong arch: {gpu.arch} is not among the image's {', '.join(archs) or 'none (CPU-only image)'}"


def _health_checks(gpu: GpuInfo) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if gpu.ecc_uncorrected_volatile:
        out.append(("fail", f"{gpu.ecc_uncorrected_volatile} uncorrected ECC errors since boot"))
    elif gpu.ecc_uncorrected_aggregate:
        out.append(("warn", f"{gpu.ecc_uncorrected_aggregate} uncorrected ECC errors in the card's lifetime"))
    harmful = sorted(set(gpu.throttle_reasons) & HARMFUL_THROTTLE)
    if harmful:
        out.append(("warn", f"throttled: {', '.join(harmful)}"))
    return out


def gpu_stage(ctx: Context) -> StageResult:
    facts = ctx.facts
    found = ctx.probe.probe()
    ctx.gpus = found.gpus
    values: dict[str, Any] = {"gpus": [g.to_dict() for g in found.gpus], "probe_error": found.error}
    if facts.cuda == "none" or not found.gpus:
        ctx.device = ctx.device_override or "cpu"
        why = "CPU-only image" if facts.cuda == "none" else f"no GPU ({found.error or 'none found'})"
        values["mode"] = "cpu"
        if facts.cpu_ok:
            return StageResult("gpu", "pass", f"{why}, CPU mode (image is cpu_ok)", values)
        return StageResult("gpu", "fail", f"{why}: image {facts.name} needs one of {', '.join(facts.gpu_archs)}", values)

    values["mode"] = ctx.mode = "gpu"
    ctx.device = ctx.device_override or "cuda"
    status, notes = "pass", []
    for gpu in found.gpus:
        checks = [_driver_check(gpu, facts), _arch_check(gpu, list(facts.gpu_archs)), *_health_checks(gpu)]
        bad = [(s, m) for s, m in checks if s != "pass"]
        status = worst(status, *(s for s, _ in checks))
        prefix = f"GPU {gpu.index}: " if len(found.gpus) > 1 else ""
        notes += [prefix + m for _, m in bad]
    if ctx.device.startswith("cuda"):
        cuda_error = _torch_cuda_error()
        if cuda_error:
            status = "fail"
            notes.append(f"NVML sees {len(found.gpus)} GPU(s) but torch cannot use CUDA: {cuda_error}")
    g = found.gpus[0]
    head = f"{len(found.gpus)}x {g.name}, {g.memory_total_bytes / 2**30:.0f} GiB, {g.arch}, driver {g.driver_version}"
    return StageResult("gpu", status, "; ".join(notes) if notes else head, values)


def _torch_cuda_error() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return f"torch {torch.__version__} reports no usable CUDA device"
        torch.cuda.init()
    except Exception as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


# ------------------------------------------------------------------------- 2. kernels


def fp8_kernel_check(device: str) -> dict[str, Any]:
    """The boot check of an FP8-weight image: the path this device runs (``$GPUBAKE_FP8_BACKEND``
    or the arch table's), against the float32 reference (`selfcheck.fp8_selfcheck`)."""
    from gpubake.kernels.fp8_linear import select_fp8_backend
    from gpubake.kernels.selfcheck import fp8_selfcheck

    return fp8_selfcheck(select_fp8_backend(device), device)


def kernels_stage(ctx: Context) -> StageResult:
    """The GEMM kernels of the image's checkpoint format: NVFP4's (`selfcheck`), or for an
    image whose model is quantized to fp8 the FP8-weight path's (`fp8_kernel_check`)."""
    fp8 = ctx.facts.model.quantization == "fp8"
    check = ctx.kernel_check
    if check is None:
        if fp8:
            check = fp8_kernel_check
        else:
            from gpubake.kernels.selfcheck import selfcheck as check
    kind = "FP8" if fp8 else "NVFP4"
    try:
        res = dict(check(ctx.device))
    except Exception as exc:
        return StageResult("kernels", "fail", f"{kind} kernel check crashed on {ctx.device}: {one_line(exc)}")
    backend = res.get("backend", "?")
    if res.get("ok"):
        err = res.get("max_rel_error")
        detail = f", max rel error {err:.2e}" if isinstance(err, (int, float)) else ""
        return StageResult("kernels", "pass", f"backend {backend} matches the reference{detail}", res)
    return StageResult("kernels", "fail", f"backend {backend} disagrees with the reference: {res}", res)


# ------------------------------------------------------------------------- 3. model


def model_stage(ctx: Context) -> StageResult:
    from gpubake.smoke_tests.modelcheck import check_model_dir

    res = check_model_dir(ctx.model_dir, quick=ctx.quick)
    values = {"model_dir": str(ctx.model_dir), "quick": ctx.quick, **res.to_dict()}
    problems = list(res.problems)
    if res.model_id and res.model_id != ctx.model_id:
        problems.append(f"holds {res.model_id!r}, image expects {ctx.model_id!r}")
    want_fmt = ctx.facts.model.quantization
    if res.format and want_fmt and res.format != want_fmt:
        problems.append(f"format {res.format!r}, image expects {want_fmt!r}")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return StageResult("model", "fail", f"{problems[0]}{more}", values)
    how = "sampled sha256" if ctx.quick else "full sha256"
    msg = f"{res.files} files, {res.total_bytes / 2**20:.1f} MiB match the manifest ({how} of {len(res.hashed)})"
    return StageResult("model", "pass", msg, values)


# ------------------------------------------------------------------------- 4. render


def sampled_model(ctx: Context) -> Any:
    """The image's model, sampled with the recipe its facts name (else its own)."""
    from gpubake.provisioning.models import model_for

    return model_for(ctx.model_id, ctx.facts.model.recipe)


def render_params(ctx: Context) -> RenderParams:
    """The table's clip for the image's model; the step count of a fixed-schedule
    (step-distilled) recipe is the recipe's, whatever the table says."""
    info = sampled_model(ctx)
    entry = ctx.table.models.get(ctx.table_key)
    if entry is not None:
        params = entry.render
    else:
        params = RenderParams(prompt="a red fox running through fresh snow", height=info.height, width=info.width,
                              num_frames=5, steps=2, seed=1234)
    if info.recipe.fixed_steps and params.steps != info.recipe.steps:
        params = params.model_copy(update={"steps": info.recipe.steps})
    return params


def _load(ctx: Context) -> Any:
    """The service's pipeline (weights, then the runtime plan of `ctx.device`)."""
    if ctx.preimport is not None:
        # its imports finish before this stage's own: two threads importing one package's
        # circular imports at once can see a partly initialised module
        ctx.preimport.join()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from gpubake.provisioning.pipeline import load_serving_pipeline

    # A boot log wants one line per stage, not the libraries' per-file progress bars.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    loaded = load_serving_pipeline(ctx.model_dir, ctx.device, ctx.pipeline_loader)
    ctx.runtime = loaded.runtime()
    pipe = loaded.pipe
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def render_stage(ctx: Context) -> StageResult:
    from gpubake.provisioning.render import render

    params: RenderParams | None = None
    try:
        params = render_params(ctx)
        model = sampled_model(ctx)
        # the service's settings: the recipe's scheduler, boundary and guidance, the model's negative prompt
        sampling = {"fps": model.fps, "negative_prompt": model.negative_prompt, "recipe": model.recipe}
        t0 = time.perf_counter()
        ctx.pipeline = _load(ctx)
        ctx.load_seconds = time.perf_counter() - t0
        if ctx.device.startswith("cuda"):
            # Lazy CUDA init, Triton compiles, cuDNN autotuning, each expert's first weight
            # preparation and the plan's regional compile (guarded on shape: the warm-up
            # must render the timed clip's exact params): all steps, so both experts warm
            # up, kept out of the timings.
            ctx.warmup = render(ctx.pipeline, params.prompt, params.height, params.width, params.num_frames,
                                params.steps, params.seed, ctx.out_dir / "warmup", **sampling)
        for i in range(max(1, ctx.sustained)):
            out = ctx.out_dir if i == 0 else ctx.out_dir / f"run{i + 1}"
            ctx.renders.append(render(ctx.pipeline, params.prompt, params.height, params.width,
                                      params.num_frames, params.steps, params.seed, out, **sampling))
    except Exception as exc:
        return StageResult("render", "fail", f"render failed: {one_line(exc)}",
                           {"params": params.model_dump() if params else None, "load_seconds": ctx.load_seconds,
                            "runtime": ctx.runtime})
    first = ctx.renders[0]
    values = {
        "params": params.model_dump(),
        "recipe": model.recipe.to_dict(),
        "load_seconds": round(ctx.load_seconds or 0.0, 3),
        "video": str(first.video),
        "first_frame": str(first.first_frame),
        "video_bytes": first.video.stat().st_size,
        "runs": [r.to_dict() for r in ctx.renders],
        "warmup_seconds": round(ctx.warmup.total_seconds, 3) if ctx.warmup else None,
        "runtime": ctx.runtime,
        "prefetch": ctx.prefetch.summary() if ctx.prefetch else None,
        "preimport": ctx.preimport.summary() if ctx.preimport else None,
        "compile_cache": ctx.compile_cache,
        "cuda_alloc_conf": ctx.cuda_alloc_conf,
    }
    msg = (f"{first.frames} frames {first.width}x{first.height}, {params.steps} steps ({model.recipe.name}) "
           f"on {ctx.device} -> {first.video.name} + {first.first_frame.name}")
    # an attention kernel that is installed but computed the wrong thing on this GPU: the
    # plan ran the next one, and the machine's owner should know
    checks = (ctx.runtime or {}).get("attention_checks", [])
    broken = [c for c in checks if c.get("installed", True) and not c.get("ok")]
    fused = [c for c in broken if c.get("lever")]  # a fusion lever's Triton pass (runtime.FUSED_KERNELS)
    broken = [c for c in broken if c not in fused]
    if broken:
        ran = (ctx.runtime or {}).get("plan", {}).get("attention", "?")
        msg += "; " + ", ".join(f"{c['kernel']} attention failed its check ({c.get('reason')})" for c in broken)
        msg += f", ran {ran}"
    for c in fused:
        msg += f"; {c['kernel']} ({c['lever']}) failed its check ({c.get('reason')}), ran diffusers' own"
    return StageResult("render", "warn" if broken or fused else "pass", msg, values)


# ------------------------------------------------------------------------- 5. throughput


def throughput_stage(ctx: Context) -> StageResult:
    sps = [r.seconds_per_step for r in ctx.renders]
    e2e = [r.total_seconds for r in ctx.renders]
    sps_med, e2e_med = statistics.median(sps), statistics.median(e2e)
    spread = (max(sps) - min(sps)) / sps_med if len(sps) > 1 and sps_med > 0 else 0.0
    values: dict[str, Any] = {
        "seconds_per_step": round(sps_med, 4),
        "end_to_end_seconds": round(e2e_med, 4),
        "runs": len(sps),
        "seconds_per_step_runs": [round(s, 4) for s in sps],
        "end_to_end_seconds_runs": [round(s, 4) for s in e2e],
        "spread": round(spread, 4),
        "gpu": ctx.gpu_name,
        "device": ctx.device,
    }
    measured = f"{sps_med:.3f} s/step, {e2e_med:.2f} s end-to-end"
    notes: list[str] = []
    status = "pass"
    row = ctx.table.lookup(ctx.table_key, ctx.gpu_name)
    if row is not None:
        row = row.for_quantization(ctx.facts.model.quantization)
    if ctx.gpu_name is None:
        notes.append(f"{measured} on {ctx.device} (no reference for CPU: reported, not compared)")
    elif row is None:
        notes.append(f"{measured} on unknown GPU {ctx.gpu_name!r} (no reference: reported, not compared)")
    else:
        status, ratio = judge(sps_med, e2e_med, row, ctx.table)
        values["expected"] = row.model_dump()
        values["ratio"] = round(ratio, 3)
        word = {"pass": "within", "warn": "SLOW: beyond", "fail": "FAR TOO SLOW: beyond"}[status]
        limit = ctx.table.tolerance if status != "fail" else ctx.table.fail_factor - 1
        notes.append(f"{measured}, {ratio:.2f}x the {row.source} {row.name} reference "
                     f"({row.seconds_per_step} s/step, {row.end_to_end_seconds} s): {word} +{limit:.0%}")
        if row.source == "estimate" and ratio > ctx.table.fail_factor:  # judge: an estimate fails nothing
            notes.append(f"beyond {ctx.table.fail_factor:g}x, but the reference is an estimate: degraded, not failed")
    allowed = ctx.table.spread_for(ctx.table_key)
    if ctx.gpu_name is not None and spread > allowed:  # CPU timings are too noisy to judge
        status = worst(status, "warn")
        notes.append(f"unstable over {len(sps)} runs: spread {spread:.0%} > {allowed:.0%}")
    if ctx.gpu_name is not None:
        after = ctx.probe.throttle_reasons(ctx.gpus[0].index)
        values["throttle_reasons_after_render"] = after
        harmful = sorted(set(after) & HARMFUL_THROTTLE)
        if harmful:
            status = worst(status, "warn")
            notes.append(f"throttled under load: {', '.join(harmful)}")
    return StageResult("throughput", status, "; ".join(notes), values)


