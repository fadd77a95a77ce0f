"""Issue-18 per-clip levers as variants of bench_clip.py's gpubake case (`--variant LEVER=VALUE`).

A variant renders the same clip (prompt, seed, size, frames, steps) on the SAME loaded
serving pipeline as its gpubake@SIZE case, with one lever changed:

- ``cfg_until=F``: CFG truncation (`provisioning.cfg_truncation`), passed to `render` as a
  request would pass it; no warm-up of its own (the unguided steps run the shapes the
  guided steps ran), so a timed clip that compiled says so (`dynamo_frames_compiled`).
- ``step_cache=fbc:T`` or ``step_cache=mag:T[:K[:R]]``: the runtime plan's step cache
  (`provisioning.step_cache`) put on both experts for the variant and taken off after it; a
  warm-up clip of its own first (the cache's hooks change what dynamo traces).
- ``sparse_keep=K``: both experts' self-attention block-sparse at keep K (the plan's
  ``attention=sparse-flex``, `kernels.attention_sparse`) for the variant, then back to the
  plan's own kernel; a warm-up clip of its own first (the blocks recompile for the new
  attention function). ``sparse_block_q=N``: the same at the default keep (0.1) with N-token
  query blocks (64: LightX2V's, the lever's default; 128: the kernel's own tile).
- ``vae_channels_last=1``: the VAE's 3-D conv weights in NDHWC (the plan's lever) for the
  variant, then back; no warm-up of its own (it changes only the decode, which compiles nothing).
- ``cudnn_benchmark=1``: ``torch.backends.cudnn.benchmark`` on for the variant, then back: cuDNN
  times its convolution algorithms for each new input shape and keeps the fastest, instead of
  its heuristic's pick (the VAE decode is a chain of 3-D convolutions, a third of a sparse
  4-step 480p clip); a warm-up clip of its own first (the timing runs on each shape's first call).
- ``vae_conv_pad=0|1``: the decoder's 96-filter convolutions padded to 128 filters (the plan's
  lever, on for Hopper: so ``=0`` is the comparison there), then back to the plan's; no
  warm-up of its own (eager decode).
- ``fuse_qkv=0|1``: each self-attention's Q, K, V as one GEMM (the plan's lever) on both
  experts, then back; a warm-up clip of its own first (the blocks recompile).
- ``fuse_qk_rope=0|1``: each self-attention's Q/K norm and rotary embedding as one Triton pass
  (the plan's lever) on both experts, then back; a warm-up clip of its own first (the blocks recompile).
- ``fuse_ffn_gelu=0|1``: each FFN's GELU inside its down-projection's activation quantization (the
  plan's lever) on both experts, then back; a warm-up clip of its own first (the blocks recompile).
- ``fuse_norm_quant=0|1``: each block's norms quantizing for their linears (`kernels.norm_quant`,
  the plan's lever) on both experts, then back; a warm-up clip of its own first (the blocks recompile).
- ``vae_fused_norm=0|1``: the decoder's RMS norms + SiLUs as one Triton pass each (the plan's
  lever), then back; a warm-up clip of its own first (Triton compiles the kernel per channel count).
- ``vae_compile=1``: the VAE's decoder under ``torch.compile`` (the plan's lever,
  `runtime.set_vae_compile`) for the variant, then eager again; a warm-up clip of its own first
  (the decoder's graphs compile there).

Reported per variant: the timed clip (as every case), transformer forwards and full block
evaluations (forward hooks; `blocks_skipped_fraction`), and its quality against the
gpubake case's clip: relative error of the final latents and PSNR of the decoded video
(both captured at `vae.decode`). The 40-step clip from a shorter run: CFG truncation is
extrapolated as text + decode + k guided steps + (recipe steps - k) unguided steps, each at
its own median. First Block Cache's skips depend on the whole clip, so its clip is given only
when the run has the recipe's step count; MagCache's are known in advance, so its clip is
text + decode + the forwards it computes at the recipe's step count, at the gpubake case's
guided step.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gpubake.errors import GpubakeError

LEVERS = ("cfg_until", "step_cache", "sparse_keep", "sparse_block_q", "vae_channels_last", "cudnn_benchmark",
          "vae_compile", "vae_conv_pad", "vae_fused_norm", "fuse_qkv", "fuse_qk_rope", "fuse_ffn_gelu",
          "fuse_norm_quant")
EXPERT_LEVERS = ("step_cache", "sparse_keep", "sparse_block_q", "fuse_qkv", "fuse_qk_rope", "fuse_ffn_gelu",
                 "fuse_norm_quant")  # change what the experts' compiled blocks trace


class VariantError(GpubakeError):
    """A --variant that names no lever or a bad value."""


@dataclass(frozen=True)
class Variant:
    lever: str
    value: Any  # float (cfg_until, sparse_keep), int (sparse_block_q) or step_cache.StepCache

    @property
    def name(self) -> str:
        return f"{self.lever}={self.value:g}" if isinstance(self.value, float) else f"{self.lever}={self.value}"

    @property
    def warms_up(self) -> bool:
        """A warm-up clip of its own first: the lever changes what the compiled blocks trace, what
        compiles (the decoder) or what cuDNN times on each shape's first call."""
        return self.lever in (*EXPERT_LEVERS, "cudnn_benchmark", "vae_compile", "vae_fused_norm")


def parse_variant(text: str) -> Variant:
    """``cfg_until=0.75``, ``step_cache=fbc:0.05``, ``step_cache=mag:0.04`` or ``sparse_keep=0.1``
    (checked as the service and the plan check them)."""
    from gpubake.provisioning.cfg_truncation import check_cfg_until
    from gpubake.provisioning.step_cache import StepCache

    lever, sep, value = (x.strip() for x in text.partition("="))
    if not sep or lever not in LEVERS:
        raise VariantError(f"{text!r} is not LEVER=VALUE with LEVER one of {', '.join(LEVERS)}")
    if lever == "cfg_until":
        try:
            number: Any = float(value)
        except ValueError:
            number = value
        cut = check_cfg_until(number)
        return Variant(lever, cut)
    if lever == "sparse_keep":
        from gpubake.kernels.attention_sparse import SparseAttentionError, check_keep

        try:
            return Variant(lever, float(check_keep(float(value))))
        except (ValueError, SparseAttentionError) as exc:
            raise VariantError(f"{text!r}: {exc}") from None
    if lever in ("vae_conv_pad", "vae_fused_norm", "fuse_qkv", "fuse_qk_rope", "fuse_ffn_gelu", "fuse_norm_quant"):
        if value not in ("0", "1"):
            raise VariantError(f"{text!r}: {lever}=0 or {lever}=1")
        return Variant(lever, int(value))
    if lever in ("vae_channels_last", "cudnn_benchmark", "vae_compile"):
        if value != "1":
            raise VariantError(f"{text!r}: {lever}=1 (the gpubake case itself is 0)")
        return Variant(lever, 1)
    if lever == "sparse_block_q":
        from gpubake.kernels.attention_sparse import SparseAttentionError, check_block_q

        try:
            return Variant(lever, check_block_q(int(value)))
        except (ValueError, SparseAttentionError) as exc:
            raise VariantError(f"{text!r}: {exc}") from None
    cache = StepCache.parse(value)
    if not cache.on:
        raise VariantError(f"{text!r}: the gpubake case itself is step_cache=none")
    return Variant(lever, cache)


@contextlib.contextmanager
def captured_decode(pipe: Any) -> Iterator[dict[str, Any]]:
    """The latents the pipeline last decoded and the decoded video (float16 on the host), via a
    wrapper around `pipe.vae.decode` (an instance attribute, removed on the way out)."""
    got: dict[str, Any] = {}
    vae = pipe.vae
    decode = vae.decode

    def wrapped(z: Any, *args: Any, **kwargs: Any) -> Any:
        out = decode(z, *args, **kwargs)
        video = out[0] if isinstance(out, tuple) else out.sample
        got["latents"] = z.detach().float().cpu()
        got["video"] = video.detach().to("cpu").half()
        return out

    vae.decode = wrapped
    try:
        yield got
    finally:
        del vae.decode  # back to the class's method


def quality(base: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """The variant's clip against the base clip: latents' relative L2 error, the decoded
    video's PSNR (values in [-1, 1]: peak-to-peak 2) and largest absolute difference."""
    if "latents" not in base or "latents" not in got:
        return {"error": "no decoded clip captured"}
    b, g = base["latents"], got["latents"]
    rel = float((g - b).norm() / b.norm().clamp_min(1e-30))
    vb, vg = base["video"].float(), got["video"].float()
    mse = float(((vg - vb) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
    return {"latent_rel_err": round(rel, 6), "video_psnr_db": round(psnr, 2) if math.isfinite(psnr) else "inf",
            "video_max_abs": round(float((vg - vb).abs().max()), 5)}


def cfg_clip_at_recipe_steps(timed: dict[str, Any], guided: int, cfg_until: float, recipe_steps: int,
                             base_step_s: float | None) -> dict[str, Any]:
    """A truncated clip at the recipe's step count from a shorter run: text + decode + k guided
    + (recipe_steps - k) unguided steps, k = `cfg_steps(cfg_until, recipe_steps)`. Steps 2..k
    are the guided ones of `step_seconds` (the first step carries the text encoder); with none
    measured, the gpubake case's guided median (`base_step_s`)."""
    from gpubake.provisioning.cfg_truncation import cfg_steps

    steps = timed["step_seconds"]
    g_own, u_own = steps[: max(guided - 1, 0)], steps[max(guided - 1, 0):]
    g = statistics.median(g_own) if g_own else base_step_s
    u = statistics.median(u_own) if u_own and guided < timed["steps"] else None
    k = cfg_steps(cfg_until, recipe_steps)
    out: dict[str, Any] = {"cfg_steps_at_recipe_steps": k, "guided_step_s": g, "unguided_step_s": u}
    if (k and g is None) or (k < recipe_steps and u is None):
        out.update(clip_at_recipe_steps_s=None, extrapolation="none: the run measured no guided or no unguided step")
        return out
    at = timed["text_encoder_s"] + timed["decode_s"] + k * (g or 0.0) + (recipe_steps - k) * (u or 0.0)
    out.update(clip_at_recipe_steps_s=round(at, 3),
               extrapolation=f"text_encoder_s + decode_s + {k} x guided_step_s + {recipe_steps - k} x unguided_step_s")
    return out


def _delta(now: dict[str, dict[str, int]], before: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]]:
    before = before or {}
    return {k: {e: n - before.get(k, {}).get(e, 0) for e, n in v.items()} for k, v in now.items()}


def mag_clip_at_recipe_steps(timed: dict[str, Any], pipe: Any, cache: Any, base_step_s: float | None) -> dict[str, Any]:
    """A MagCache clip at the recipe's step count from a shorter run: its skips there are known
    in advance (`mag_cache.clip_schedule`), so text + decode + (forwards computed / 2) guided
    steps at the gpubake case's median; a skipped forward is counted as free (it still runs the
    patch embedding, the time embedding, the output projection and one add: a few ms)."""
    from gpubake.provisioning.mag_cache import MagSettings, clip_schedule, schedule_facts

    steps = timed["recipe_steps"]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the pipeline's own stays as it is
    scheduler.set_timesteps(steps)
    sched = clip_schedule(schedule_facts(pipe, steps, scheduler),
                          MagSettings(cache.threshold, cache.max_skips, cache.retention))
    if sched.table is None or base_step_s is None:
        return {"clip_at_recipe_steps_s": None,
                "extrapolation": "none: " + ("no ratio table for the schedule" if sched.table is None
                                             else "the gpubake case measured no guided step")}
    computed = 2 * steps - sched.skipped_forwards()
    at = timed["text_encoder_s"] + timed["decode_s"] + computed / 2 * base_step_s
    return {"clip_at_recipe_steps_s": round(at, 3), "mag_forwards_at_recipe_steps": {"computed": computed,
            "skipped": sched.skipped_forwards()},
            "extrapolation": f"text_encoder_s + decode_s + {computed} / 2 x the gpubake case's guided step "
                             f"(skips from the {sched.table} table at {steps} steps; a skipped forward counted as 0 s)"}


def run_variant(row: dict[str, Any], sp: Any, variant: Variant, base: dict[str, Any], render_clip: Any,
                clip_args: tuple, warmup_steps: int | None) -> None:
    """Fill `row` with the variant's clips, counts and quality against `base` (the gpubake
    case's row, its `captured` decode kept aside by the caller)."""
    import torch

    from gpubake.provisioning.runtime import (apply_attention, set_fused_ffn_gelu, set_fused_norm_quant,
                                              set_fused_qk_rope, set_fused_qkv, set_vae_compile, set_vae_conv_padding,
                                              set_vae_fused_norm, set_vae_layout)
    from gpubake.provisioning.mag_cache import mag_stats
    from gpubake.provisioning.models import experts_of
    from gpubake.provisioning.step_cache import apply_step_caches, blocks_of, count_blocks

    # lever -> (the plan's setter on one expert, the key its count is reported under)
    FUSERS = {"fuse_qkv": (set_fused_qkv, "fused_qkv_modules"), "fuse_qk_rope": (set_fused_qk_rope, "fused_qk_rope_modules"),
              "fuse_ffn_gelu": (set_fused_ffn_gelu, "fused_ffn_gelu_modules"),
              "fuse_norm_quant": (set_fused_norm_quant, "fused_norm_quant_blocks")}

    pipe = sp.pipe
    experts = experts_of(pipe)
    row.update(stack="gpubake", variant=variant.name, lever=variant.lever)
    extra: dict[str, Any] = {}
    benchmark = torch.backends.cudnn.benchmark  # restored below, whatever the variant
    try:
        if variant.lever == "step_cache":
            row["applied"] = apply_step_caches(pipe, variant.value)
        elif variant.lever in ("sparse_keep", "sparse_block_q"):
            from gpubake.kernels.attention_sparse import BLOCK_Q, DEFAULT_KEEP, set_sparse_self_attention

            keep, bq = ((variant.value, BLOCK_Q) if variant.lever == "sparse_keep" else (DEFAULT_KEEP, variant.value))
            row["applied"] = {n: {"sparse_attention_modules": set_sparse_self_attention(m, keep, bq)}
                              for n, m in experts.items()}
        elif variant.lever == "vae_channels_last":
            row["applied"] = {"vae": {"channels_last_conv3d": set_vae_layout(pipe.vae, True)}}
        elif variant.lever == "vae_compile":
            row["applied"] = {"vae": {"compiled_decoder": int(set_vae_compile(pipe.vae, True))}}
        elif variant.lever in FUSERS:
            fuse, key = FUSERS[variant.lever]
            row["applied"] = {n: {key: fuse(m, bool(variant.value))} for n, m in experts.items()}
        elif variant.lever == "vae_fused_norm":
            row["applied"] = {"vae": {"fused_blocks": set_vae_fused_norm(pipe.vae, bool(variant.value)),
                                      "fused_norm": variant.value}}
        elif variant.lever == "vae_conv_pad":
            row["applied"] = {"vae": {"padded_convs": set_vae_conv_padding(pipe.vae, bool(variant.value)),
                                      "conv_pad": variant.value}}
        elif variant.lever == "cudnn_benchmark":
            torch.backends.cudnn.benchmark = True
            row["applied"] = {"cudnn": {"benchmark": True}}
        else:
            extra["cfg_until"] = variant.value
        if variant.warms_up:
            row["warmup"] = render_clip(*clip_args, steps=warmup_steps)
        mag_before = (m.to_dict() if (m := mag_stats(pipe)) else None)
        with count_blocks(pipe) as counts, captured_decode(pipe) as got:
            row["timed"] = render_clip(*clip_args, extra=extra)
        if (m := mag_stats(pipe)) is not None:
            row["mag_forwards"] = _delta(m.to_dict(), mag_before)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if variant.lever == "vae_channels_last":
            set_vae_layout(pipe.vae, sp.plan.vae_channels_last)
        if variant.lever == "vae_compile":
            set_vae_compile(pipe.vae, sp.plan.vae_compile)
        if variant.lever == "vae_conv_pad":
            set_vae_conv_padding(pipe.vae, sp.plan.vae_conv_pad)
        if variant.lever == "vae_fused_norm":
            set_vae_fused_norm(pipe.vae, sp.plan.vae_fused_norm)
        if variant.lever == "step_cache":  # back to the plan's own
            apply_step_caches(pipe, sp.plan.step_cache)
        elif variant.lever in FUSERS:
            for m in experts.values():
                FUSERS[variant.lever][0](m, getattr(sp.plan, variant.lever))
        elif variant.lever in EXPERT_LEVERS:  # the sparse-attention levers
            for m in experts.values():
                apply_attention(m, sp.plan)
    timed = row["timed"]
    row["counts"] = counts.to_dict(blocks_per_forward=len(blocks_of(next(iter(experts.values())))))
    row["quality_vs_gpubake"] = quality(base.get("captured", {}), got)
    base_t = base.get("timed", {})
    if variant.lever == "cfg_until" and timed["clip_at_recipe_steps_extrapolated"]:
        est = cfg_clip_at_recipe_steps(timed, timed["cfg_steps"], variant.value, timed["recipe_steps"],
                                       base_t.get("seconds_per_step"))
        timed.update(est)
    elif variant.lever == "step_cache" and variant.value.kind == "mag" and timed["clip_at_recipe_steps_extrapolated"]:
        timed.update(mag_clip_at_recipe_steps(timed, pipe, variant.value, base_t.get("seconds_per_step")))
    elif variant.lever == "step_cache" and timed["clip_at_recipe_steps_extrapolated"]:
        timed.update(clip_at_recipe_steps_s=None,
                     extrapolation=f"none: a step cache's skips depend on the whole schedule (run --steps "
                                   f"{timed['recipe_steps']})")
    at, base_at = timed.get("clip_at_recipe_steps_s"), base_t.get("clip_at_recipe_steps_s")
    if at and base_at:
        row["speedup_vs_gpubake"] = round(base_at / at, 3)
