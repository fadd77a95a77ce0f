"""Render one clip with a loaded Wan pipeline: MP4 + first-frame PNG + timings.

Shared by the boot self-test (fixed seed, few steps, timed against a table) and the
generation service, so what the self-test proves is exactly what the service runs. A
sampling recipe (`models.Recipe`), when given, is put on the pipeline first
(`sampling.apply_recipe`: scheduler, shift, fixed timesteps, expert boundary); guidance
and the negative prompt are the caller's, which takes them from the same recipe.
Per-step times come from the pipeline's `callback_on_step_end`, with a CUDA sync so
each timestamp is when the step really ended, not when its kernels were queued; the same
callback ends classifier-free guidance after the first `cfg_until` of the steps
(`cfg_truncation`), when the caller or the recipe asks for it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpubake import envs
from gpubake.errors import GpubakeError

if TYPE_CHECKING:
    from gpubake.provisioning.models import Recipe

VIDEO_NAME = "video.mp4"
FRAME_NAME = "frame0.png"


class RenderError(GpubakeError):
    """Bad render parameters (size, frames, steps) or an output that could not be written."""


@dataclass
class RenderResult:
    """Where the clip went and how long it took (seconds, wall clock)."""

    video: Path
    first_frame: Path
    seconds_per_step: float
    total_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    encode_and_first_step_seconds: float = 0.0
    decode_seconds: float = 0.0
    text_encoder_seconds: float = 0.0  # the text encoder's forwards (prompt, and the negative one with CFG)
    denoise_seconds: float = 0.0  # end of the text encoding -> end of the last step
    frames: int = 0
    height: int = 0
    width: int = 0
    steps: int = 0
    seed: int = 0
    device: str = "cpu"
    recipe: str | None = None  # the sampling recipe's name, when one was applied
    cfg_steps: int = 0  # steps that ran both CFG passes (the first ones; `cfg_until`)
    step_cache: str = "none"  # the step cache the clip ran with (`step_cache.StepCache`)
    forwards_skipped: int | None = None  # transformer forwards MagCache skipped (None: no MagCache)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["video"] = str(self.video)
        d["first_frame"] = str(self.first_frame)
        for key in ("seconds_per_step", "total_seconds", "encode_and_first_step_seconds", "decode_seconds",
                    "text_encoder_seconds", "denoise_seconds"):
            d[key] = round(d[key], 4)
        d["step_seconds"] = [round(s, 4) for s in self.step_seconds]
        return d


def check_params(height: int, width: int, num_frames: int, steps: int) -> None:
    """Wan's VAE (8x spatial, 4x temporal) and 2x2 patches need these shapes."""
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 16:
            raise RenderError(f"{name}={value}: must be a positive multiple of 16")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise RenderError(f"num_frames={num_frames}: must be 4k+1 (1, 5, 9, ... 81)")
    if steps < 1:
        raise RenderError(f"steps={steps}: must be at least 1")


def _device_of(pipe: Any) -> Any:
    import torch

    dev = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def render(
    pipe: Any,
    prompt: str,
    height: int,
    width: int,
    num_frames: int,
    steps: int,
    seed: int,
    out_dir: str | os.PathLike[str],
    *,
    fps: int = 16,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    recipe: Recipe | None = None,
    cfg_until: float | None = None,
    step_cache: str | None = None,
) -> RenderResult:
    """Run the pipeline once and write `out_dir/video.mp4` and `out_dir/frame0.png`.

    The latents come from a CPU generator seeded with `seed`, so one seed gives the same
    starting noise on every device. Both files appear atomically. `step_cache`: this clip's
    (`step_cache.StepCache` forms), else the experts' own (the runtime plan's).
    """
    import torch

    check_params(height, width, num_frames, steps)
    if recipe is not None:
        from gpubake.provisioning.sampling import SamplingError, apply_recipe, check_steps

        try:
            check_steps(recipe, steps)
            apply_recipe(pipe, recipe)
        except SamplingError as exc:
            raise RenderError(str(exc)) from None
        if guidance_scale is None:  # the recipe's, unless the caller overrides it
            guidance_scale, guidance_scale_2 = recipe.guidance_scale, recipe.guidance_scale_2
        if cfg_until is None:
            cfg_until = recipe.cfg_until
    guided, end_cfg = _cfg_truncation(guidance_scale, cfg_until, steps)
    if guided == 0 and (guidance_scale is None or guidance_scale > 1.0):  # cfg_until rounds to no guided step
        guidance_scale, guidance_scale_2 = 1.0, (1.0 if guidance_scale_2 is not None else None)
    device = _device_of(pipe)
    stamps: list[float] = []

    def on_step_end(_pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        _sync(device)
        stamps.append(time.perf_counter())
        if end_cfg is not None:
            end_cfg(_pipe, step)
        return callback_kwargs

    kwargs: dict[str, Any] = {}
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if guidance_scale_2 is not None:  # the low-noise expert's (A14B); diffusers reuses guidance_scale otherwise
        kwargs["guidance_scale_2"] = guidance_scale_2
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    from gpubake.provisioning.mag_cache import skipped_forwards
    from gpubake.provisioning.step_cache import StepCache, StepCacheError, reset_step_caches, step_cache_for_clip

    try:
        clip_cache = StepCache.parse(step_cache) if step_cache is not None else None
    except StepCacheError as exc:
        raise RenderError(str(exc)) from None
    with step_cache_for_clip(pipe, clip_cache) as used:
        reset_step_caches(pipe)  # a step cache starts every clip empty
        skipped_before = skipped_forwards(pipe)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), _timed(getattr(pipe, "text_encoder", None), device) as encoder:
            out = pipe(
                prompt=prompt,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=steps,
                generator=generator,
                output_type="pt",  # frames stay on the device until they are uint8 (_to_uint8)
                callback_on_step_end=on_step_end,
                **kwargs,
            )
            frames = _to_uint8(out.frames[0])
        decoded = time.perf_counter()  # the decode ends with uint8 frames on the host
        skipped = skipped_forwards(pipe) - skipped_before if skipped_before is not None else None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    video = out_dir / VIDEO_NAME
    first = out_dir / FRAME_NAME
    write_mp4(frames, video, fps=fps, preset=envs.GPUBAKE_X264_PRESET)
    write_png(frames[0], first)
    end = time.perf_counter()

    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    first_step = stamps[0] - start if stamps else decoded - start
    per_step = statistics.median(step_seconds) if step_seconds else first_step
    return RenderResult(
        video=video,
        first_frame=first,
        seconds_per_step=per_step,
        total_seconds=end - start,
        step_seconds=step_seconds,
        encode_and_first_step_seconds=first_step,
        decode_seconds=decoded - (stamps[-1] if stamps else start),
        text_encoder_seconds=encoder.seconds,
        denoise_seconds=(stamps[-1] - (encoder.ended or start)) if stamps else 0.0,
        frames=int(frames.shape[0]),
        height=int(frames.shape[1]),
        width=int(frames.shape[2]),
        steps=steps,
        seed=int(seed),
        device=str(device),
        recipe=getattr(recipe, "name", None),
        cfg_steps=guided,
        step_cache=str(used),
        forwards_skipped=skipped,
    )


def _cfg_truncation(guidance_scale: float | None, cfg_until: float | None, steps: int) -> tuple[int, Any]:
    """(guided steps, the step callback that ends CFG or None). No CFG (guidance 1.0): 0, None.
    `guidance_scale` None is the pipeline's own default (5.0: guided)."""
    from gpubake.provisioning.cfg_truncation import CfgTruncationError, cfg_steps, truncate_after

    if guidance_scale is not None and guidance_scale <= 1.0:
        return 0, None
    try:
        guided = cfg_steps(cfg_until, steps)
    except CfgTruncationError as exc:
        raise RenderError(str(exc)) from None
    return guided, truncate_after(guided, steps)


class _Span:
    """What `_timed` measured: seconds inside the module's forwards, and when the last ended."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.ended: float | None = None
        self._began = 0.0


@contextlib.contextmanager
def _timed(module: Any, device: Any) -> Iterator[_Span]:
    """Time `module`'s forwards with hooks (synchronised on CUDA), removed on the way out."""
    span = _Span()
    if not hasattr(module, "register_forward_pre_hook"):
        yield span
        return

    def pre(_m: Any, _args: Any) -> None:
        _sync(device)
        span._began = time.perf_counter()

    def post(_m: Any, _args: Any, _out: Any) -> None:
        _sync(device)
        span.ended = time.perf_counter()
        span.seconds += span.ended - span._began

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield span
    finally:
        for h in handles:
            h.remove()


NON_FINITE = "pipeline produced NaN/inf pixels (numerically broken kernels or a faulty GPU)"
FRAMES_PER_COPY = 16  # frames converted on the device per copy to the host (~0.2 GB of float32 at 720p)


def _to_uint8(frames: Any) -> Any:
    """Pipeline output (float in [0, 1]: a tensor [F, C, H, W], or an array [F, H, W, C]) ->
    uint8 frames [F, H, W, C] on the host.

    A tensor is converted where it is, the GPU: the host then gets a quarter of the bytes of
    diffusers' float32 frames and none of its single-threaded conversions (at 720p x 81 they
    cost more than a second); the same float32 arithmetic as the array path, bit for bit."""
    import numpy as np
    import torch

    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise RenderError(f"pipeline returned frames of shape {tuple(frames.shape)}, expected [frames, 3, height, width]")
        n, _, h, w = frames.shape
        out = np.empty((n, h, w, 3), np.uint8)
        for i in range(0, n, FRAMES_PER_COPY):  # float32 of a few frames at a time: no clip-sized copy
            x = frames[i:i + FRAMES_PER_COPY].float()
            if not bool(torch.isfinite(x).all()):
                raise RenderError(NON_FINITE)
            q = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
            out[i:i + FRAMES_PER_COPY] = q.cpu().numpy()
        return out
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 and not np.isfinite(arr).all():
        raise RenderError(NON_FINITE)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise RenderError(f"pipeline returned frames of shape {arr.shape}, expected [frames, height, width, 3]")
    return arr


X264_PRESETS = envs.declared("GPUBAKE_X264_PRESET").choices  # x264's own names, fastest first


def write_mp4(frames: Any, dest: Path, *, fps: int = 16, preset: str = "medium") -> None:
    """H.264 in MP4 (yuv420p, faststart: plays in browsers while it downloads), atomically.

    imageio picks its ffmpeg writer by extension, so the temporary name (same directory,
    renamed into place on success) ends in .mp4 rather than fsutil's .partial.
    """
    import imageio.v2 as imageio

    if preset not in X264_PRESETS:
        raise RenderError(f"x264 preset {preset!r}: one of {', '.join(X264_PRESETS)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=".partial.mp4", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=16,
            ffmpeg_log_level="error",
            output_params=["-preset", preset, "-movflags", "+faststart"],
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service serves this file
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_png(frame: Any, dest: Path) -> None:
    from PIL import Image

    from gpubake.fsutil import atomic_path

    with atomic_path(dest) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")
