"""`gpubake fidelity`: how far the NVFP4 pipeline drifts from BF16, measured.

Same prompts, same seeds, same scheduler; the two pipelines run one after the other
(only one is in memory at a time). Reports:
- per-layer SQNR of the quantized weights (from the NVFP4 manifest),
- the latent relative error ||z_nvfp4 - z_bf16|| / ||z_bf16|| after every denoising step
  (errors compound through the sampler; this shows where),
- PSNR and SSIM (scikit-image) of every decoded frame,
as fidelity.json, and a contact sheet PNG: BF16 | NVFP4 | 8x |difference| per frame.
Both pipelines sample with the model's registry recipe (scheduler, shift, expert boundary),
as the service does. `step_cache` puts a step cache (`step_cache.StepCache`) on the NVFP4
run only, so the report is its quality cost on top of the quantization's. MagCache's cost
needs the real weights, which is why this option exists.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.fsutil import atomic_path, write_json_atomic
from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest
from gpubake.provisioning.models import experts_of

DEFAULT_NEGATIVE = ""
MAX_TILE_WIDTH = 416
DIFF_GAIN = 8.0  # the difference column is amplified so small errors are visible


@dataclass
class Run:
    """One generation: latents after each step (float32, CPU) and decoded frames [F,H,W,3] in [0,1]."""

    prompt: str
    seed: int
    latents: list[Any] = field(default_factory=list)
    frames: Any = None
    seconds: float = 0.0
    forwards_skipped: int | None = None  # by MagCache (None: no MagCache on this run)


@dataclass(frozen=True)
class Settings:
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    max_sequence_length: int = 512


def generate(pipe: Any, prompt: str, seed: int, s: Settings, device: str = "cpu") -> Run:
    """Run `pipe` once, capturing the latents after every step."""
    import torch

    from gpubake.provisioning.mag_cache import skipped_forwards
    from gpubake.provisioning.step_cache import reset_step_caches

    run = Run(prompt, seed)
    reset_step_caches(pipe)  # each run starts with no cached residual
    before = skipped_forwards(pipe)

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        run.latents.append(kwargs["latents"].detach().float().cpu())
        return kwargs

    extra = {"guidance_scale_2": s.guidance_scale_2} if s.guidance_scale_2 is not None and pipe.config.boundary_ratio else {}
    t0 = time.monotonic()
    out = pipe(
        prompt,
        negative_prompt=DEFAULT_NEGATIVE,
        height=s.height,
        width=s.width,
        num_frames=s.num_frames,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="np",
        max_sequence_length=s.max_sequence_length,
        callback_on_step_end=on_step,
        callback_on_step_end_tensor_inputs=["latents"],
        **extra,
    )
    run.seconds = round(time.monotonic() - t0, 3)
    run.frames = out.frames[0]
    run.forwards_skipped = skipped_forwards(pipe) - before if before is not None else None
    return run


def rel_err(a: Any, ref: Any) -> float:
    den = float(ref.double().norm())
    return float((a.double() - ref.double()).norm()) / den if den else math.nan


def compare(ref: Run, test: Run) -> dict[str, Any]:
    """Per-step latent error and per-frame PSNR/SSIM of `test` against `ref`."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    lat = [round(rel_err(b, a), 6) for a, b in zip(ref.latents, test.latents)]
    psnr, ssim = [], []
    for fa, fb in zip(ref.frames, test.frames):
        fa64, fb64 = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
        p = peak_signal_noise_ratio(fa64, fb64, data_range=1.0) if not np.array_equal(fa64, fb64) else math.inf
        psnr.append(round(float(p), 4) if math.isfinite(p) else None)
        win = min(7, fa64.shape[0], fa64.shape[1]) | 1
        ssim.append(round(float(structural_similarity(fa64, fb64, data_range=1.0, channel_axis=-1, win_size=win)), 6))
    finite = [p for p in psnr if p is not None]
    return {
        "prompt": ref.prompt,
        "seed": ref.seed,
        "latent_rel_err_per_step": lat,
        "psnr_db_per_frame": psnr,
        "ssim_per_frame": ssim,
        "psnr_db_mean": round(sum(finite) / len(finite), 4) if finite else None,
        "ssim_mean": round(sum(ssim) / len(ssim), 6) if ssim else None,
        "seconds_bf16": ref.seconds,
        "seconds_nvfp4": test.seconds,
        **({"forwards_skipped": test.forwards_skipped} if test.forwards_skipped is not None else {}),
    }


def contact_sheet(pairs: list[tuple[Run, Run]], path: Path, max_rows: int = 4) -> None:
    """PNG grid: per run, up to `max_rows` frames as BF16 | NVFP4 | 8x|diff| columns."""
    import numpy as np
    from PIL import Image, ImageDraw

    tiles = []
    for ref, test in pairs:
        n = len(ref.frames)
        idx = sorted({round(i * (n - 1) / max(1, max_rows - 1)) for i in range(min(max_rows, n))})
        for i in idx:
            a, b = ref.frames[i], test.frames[i]
            d = np.clip(np.abs(a - b) * DIFF_GAIN, 0, 1)
            tiles.append((f"seed {ref.seed} frame {i}", [a, b, d]))
    h, w = tiles[0][1][0].shape[:2]
    # Small frames are enlarged (nearest) to >= 128 px; large ones shrunk to <= 416 px wide
    # so that a 720p sheet stays a few MB.
    scale = max(1, 128 // max(h, w)) if max(h, w) < 128 else min(1.0, MAX_TILE_WIDTH / w)
    th, tw, label_h, pad = max(1, round(h * scale)), max(1, round(w * scale)), 14, 4
    sheet = Image.new("RGB", (3 * (tw + pad) + pad, label_h + len(tiles) * (th + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(("BF16", "NVFP4", f"{DIFF_GAIN:g}x |diff|")):
        draw.text((pad + c * (tw + pad), 1), name, fill="black")
    for r, (label, imgs) in enumerate(tiles):
        y = label_h + r * (th + label_h + pad)
        draw.text((pad, y), label, fill="black")
        for c, img in enumerate(imgs):
            im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype("uint8"))
            resample = Image.NEAREST if tw >= w else Image.LANCZOS
            sheet.paste(im.resize((tw, th), resample), (pad + c * (tw + pad), y + label_h))
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")


def settings_for(nvfp4: Path, *, height: int | None, width: int | None, num_frames: int | None, steps: int | None) -> tuple[Settings, str | None]:
    """Registry defaults of the checkpoint's model, overridden by flags."""
    from gpubake.provisioning.models import get_model

    mid = read_manifest(nvfp4).get("model_id") if (nvfp4 / MANIFEST_NAME).is_file() else None
    info = get_model(mid) if mid else None
    if info is None and None in (height, width, num_frames, steps):
        raise GpubakeError(f"{nvfp4}: manifest names no registry model; pass --height, --width, --frames and --steps")
    return (
        Settings(
            height=height or info.height,  # type: ignore[union-attr]
            width=width or info.width,  # type: ignore[union-attr]
            num_frames=num_frames or info.num_frames,  # type: ignore[union-attr]
            steps=steps or info.num_inference_steps,  # type: ignore[union-attr]
            guidance_scale=info.guidance_scale if info else 4.0,
            guidance_scale_2=info.guidance_scale_2 if info else None,
            max_sequence_length=16 if mid == "tiny-wan2.2" else 512,
        ),
        mid,
    )


def layer_sqnr(nvfp4: Path) -> dict[str, float | None]:
    q = read_manifest(nvfp4).get("quantization") or {}
    return {k: v.get("sqnr_db") for k, v in (q.get("layers") or {}).items()}


def summarize(results: list[dict[str, Any]], sqnr: dict[str, float | None]) -> dict[str, Any]:
    def mean(xs: list[float]) -> float | None:
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        return round(sum(xs) / len(xs), 6) if xs else None

    vals = [v for v in sqnr.values() if v is not None]
    return {
        "psnr_db_mean": mean([r["psnr_db_mean"] for r in results]),
        "ssim_mean": mean([r["ssim_mean"] for r in results]),
        "latent_rel_err_last_mean": mean([r["latent_rel_err_per_step"][-1] for r in results if r["latent_rel_err_per_step"]]),
        "layer_sqnr_db_min": min(vals) if vals else None,
        "layer_sqnr_db_mean": mean(vals),
    }


def _recipe_of(model_id: str | None) -> Any:
    """The registry recipe of the checkpoint's model (None: a model the registry lacks)."""
    from gpubake.provisioning.models import get_model

    return get_model(model_id).recipe if model_id else None


def _bind_backend(pipe: Any, device: str) -> None:
    """Bind every NVFP4 (FP8) layer of the experts to the backend `device` runs (the arch
    table's default, or ``$GPUBAKE_NVFP4_BACKEND`` / ``$GPUBAKE_FP8_BACKEND``), once, as the runtime plan does."""
    from gpubake.kernels.backends import select_backend
    from gpubake.kernels.linear import bind_backends
    from gpubake.provisioning.runtime import bind_fp8

    backend = select_backend(device)
    experts = experts_of(pipe)
    for model in experts.values():
        bind_backends(model, backend)
    bind_fp8(experts, device)  # an FP8 checkpoint's layers: the path this device runs


def run_fidelity(
    bf16: str | os.PathLike[str],
    nvfp4: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    prompts: list[str],
    seeds: list[int],
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    steps: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    step_cache: str | None = None,
) -> dict[str, Any]:
    """Generate with both checkpoints, compare, write fidelity.json + contact_sheet.png in `out`.
    `step_cache`: on the NVFP4 run only (`step_cache.StepCache` forms)."""
    import gc

    import diffusers
    import torch

    from gpubake.console import console
    from gpubake.provisioning.loader import checkpoint_format, load_pipeline

    bf16, nvfp4, out = Path(bf16), Path(nvfp4), Path(out)
    fmt = checkpoint_format(nvfp4)
    if fmt not in ("nvfp4", "fp8"):
        raise GpubakeError(f"{nvfp4}: not an NVFP4 or FP8 checkpoint (run `gpubake quantize` first)")
    if checkpoint_format(bf16) != "bf16":
        raise GpubakeError(f"{bf16}: expected the BF16 checkpoint as the first argument")
    from gpubake.provisioning.step_cache import StepCache, StepCacheError, apply_step_caches

    try:
        cache = StepCache.parse(step_cache) if step_cache is not None else StepCache()
    except StepCacheError as exc:
        raise GpubakeError(f"step_cache: {exc}") from None
    s, model_id = settings_for(nvfp4, height=height, width=width, num_frames=num_frames, steps=steps)
    recipe = _recipe_of(model_id)
    if recipe is not None:
        from gpubake.provisioning.sampling import SamplingError, check_steps

        try:
            check_steps(recipe, s.steps)
        except SamplingError as exc:
            raise GpubakeError(f"--steps: {exc}") from None
    cases = [(p, sd) for p in prompts for sd in seeds]
    runs: dict[str, list[Run]] = {}
    for label, path in (("bf16", bf16), ("nvfp4", nvfp4)):
        pipe = load_pipeline(path, device=device)
        if recipe is not None:  # the sampling the service renders with
            from gpubake.provisioning.sampling import apply_recipe

            apply_recipe(pipe, recipe)
        if label == "nvfp4":  # the backend this device runs, $GPUBAKE_NVFP4_BACKEND honoured
            _bind_backend(pipe, device)
            if cache.on:
                apply_step_caches(pipe, cache)
        pipe.set_progress_bar_config(disable=not progress)
        runs[label] = []
        for p, sd in cases:
            if progress:
                console.print(f"fidelity: {label} seed={sd} {s.height}x{s.width}x{s.num_frames} {s.steps} steps")
            runs[label].append(generate(pipe, p, sd, s, device))
        del pipe
        gc.collect()
    results = [compare(a, b) for a, b in zip(runs["bf16"], runs["nvfp4"])]
    sqnr = layer_sqnr(nvfp4)
    report = {
        "model_id": model_id,
        "bf16": str(bf16),
        "nvfp4": str(nvfp4),
        "format": fmt,  # of the quantized checkpoint (the "nvfp4" slot holds an fp8 one too)
        "settings": s.__dict__,
        "recipe": recipe.name if recipe is not None else None,
        "step_cache": str(cache),  # on the NVFP4 run
        "device": device,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "runs": results,
        "layer_sqnr_db": sqnr,
        "summary": summarize(results, sqnr),
    }
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(list(zip(runs["bf16"], runs["nvfp4"])), out / "contact_sheet.png")
    write_json_atomic(out / "fidelity.json", report)
    report["contact_sheet"] = str(out / "contact_sheet.png")
    return report
