"""Turn a validated request into a render: defaults, limits, output folder.

One class for both front ends (the HTTP worker and the RunPod serverless handler), so
a request means the same clip whichever way it arrives. The model's own settings come
from its sampling recipe in the registry (`provisioning.models`): steps or a fixed
schedule, the flow shift, guidance per expert (A14B: 4.0 for the high-noise expert, 3.0
for the low-noise one; diffusers would use 5.0 for both) or none (the 4-step distilled
recipe: one forward a step), the Wan negative prompt, and the boundary between the
experts. A request may override steps, guidance, `cfg_until` (CFG truncation) and the step
cache within bounds (schemas, limits).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.provisioning.serving.limits import Limits
from gpubake.provisioning.serving.schemas import GenerateRequest, ResolvedRequest
from gpubake.provisioning.step_cache import applied_step_cache


class RequestRejected(GpubakeError):
    """A well-formed request this machine cannot serve (over a limit); answered with 422."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Generator:
    """Holds the loaded pipeline, the model's defaults and this machine's limits."""

    # why this service takes no request's step cache (None: it takes one); a group that splits
    # each clip across GPUs sets it (a skipped forward bypasses the split)
    step_cache_refused: str | None = None

    def __init__(self, pipeline: Any, model: Any, limits: Limits) -> None:
        self.pipeline = pipeline
        self.model = model  # provisioning.models.ModelInfo
        self.recipe = model.recipe
        self.limits = limits
        config = getattr(pipeline, "config", None)
        if model.boundary_ratio is not None and config is not None and "boundary_ratio" in config \
                and config.boundary_ratio != model.boundary_ratio:
            # the recipe, not whatever model_index.json the checkpoint carries, decides
            pipeline.register_to_config(boundary_ratio=model.boundary_ratio)
        # guidance_scale_2 only means something with two experts and a boundary
        self.two_experts = bool(config is not None and config.get("boundary_ratio")
                                and getattr(pipeline, "transformer_2", None) is not None)

    def defaults(self) -> dict[str, Any]:
        m = self.model
        r = self.recipe
        return {"size": f"{m.width}x{m.height}", "frames": m.num_frames, "steps": m.num_inference_steps,
                "fps": m.fps, "guidance_scale": m.guidance_scale,
                "guidance_scale_2": m.guidance_scale_2 if self.two_experts else None,
                "boundary_ratio": m.boundary_ratio if self.two_experts else None,
                "negative_prompt": m.negative_prompt,
                "recipe": {"name": r.name, "sampler": r.sampler, "shift": r.shift, "cfg": r.cfg,
                           "timesteps": list(r.timesteps) if r.timesteps is not None else None,
                           "fixed_steps": r.fixed_steps, "cfg_until": r.cfg_until},
                "step_cache": str(applied_step_cache(self.pipeline)), "magcache_table": self._magcache_table()}

    def resolve(self, req: GenerateRequest, *, rng: random.Random | None = None) -> ResolvedRequest:
        """Fill defaults and refuse what exceeds this machine's limits (RequestRejected)."""
        m, lim = self.model, self.limits
        width, height = req.width_height or (m.width, m.height)
        frames = req.frames or m.num_frames
        steps = req.steps or m.num_inference_steps
        if self.recipe.fixed_steps and steps != self.recipe.steps:
            raise RequestRejected("steps", f"this model samples a fixed {self.recipe.steps}-step schedule "
                                           f"(recipe {self.recipe.name}); got {steps}")
        if steps > lim.max_steps:
            raise RequestRejected("steps", f"at most {lim.max_steps}, got {steps}")
        where = "size" if req.size else "frames"
        pf = width * height * frames
        if pf > lim.max_pixel_frames:
            raise RequestRejected(where, f"{width}x{height}x{frames} frames is {pf} pixel-frames; this service serves "
                                         f"at most {lim.max_pixel_frames} (max_pixel_frames, {lim.basis})")
        if pf * steps > lim.max_pixel_frame_steps:
            raise RequestRejected("steps" if req.steps else where,
                                  f"{width}x{height}x{frames} frames x {steps} steps is {pf * steps}; this service "
                                  f"serves at most {lim.max_pixel_frame_steps} (max_pixel_frame_steps)")
        seed = req.seed if req.seed is not None else (rng or random.SystemRandom()).randrange(2**32)
        negative = req.negative_prompt if req.negative_prompt is not None else m.negative_prompt
        g1, g2 = self._guidance(req)
        if req.cfg_until is not None and g1 <= 1.0:
            raise RequestRejected("cfg_until", f"truncates classifier-free guidance, and guidance_scale {g1} runs none")
        cut = req.cfg_until if req.cfg_until is not None else self.recipe.cfg_until
        cache = str(applied_step_cache(self.pipeline)) if req.step_cache is None else req.step_cache
        if req.step_cache is not None:
            self._check_step_cache(req.step_cache)
        return ResolvedRequest(prompt=req.prompt, negative_prompt=negative, width=width, height=height, frames=frames,
                               steps=steps, seed=seed, guidance_scale=g1, guidance_scale_2=g2, cfg_until=cut,
                               step_cache=cache)

    def _magcache_table(self) -> str | None:
        """The MagCache calibration a request's ``mag:`` step cache would run on, or None."""
        from gpubake.provisioning.mag_cache import table_for_model

        t = table_for_model(self.model, one_expert=not self.two_experts)
        return t.id if t is not None else None

    def _check_step_cache(self, value: str) -> None:
        """A request's step cache this service can run: not across a GPU group, not in place of
        the service's First Block Cache (its hooks on the compiled blocks would recompile them),
        and MagCache only on a recipe its authors calibrated (elsewhere it would skip nothing)."""
        if self.step_cache_refused and value != "none":
            raise RequestRejected("step_cache", self.step_cache_refused)
        own = applied_step_cache(self.pipeline)
        if own.kind == "fbc" and value != str(own):
            raise RequestRejected("step_cache", f"this service runs {own} on every clip ($GPUBAKE_RUNTIME); "
                                                "a request cannot change it")
        if value.startswith("mag:"):
            from gpubake.provisioning.mag_cache import tables

            if self._magcache_table() is None:
                raise RequestRejected("step_cache", f"MagCache has no calibration for this model's recipe "
                                                    f"{self.recipe.name} (calibrated: {', '.join(t.id for t in tables())})")

    def _guidance(self, req: GenerateRequest) -> tuple[float, float | None]:
        """The request's guidance, else the recipe's; `guidance_scale` alone sets both experts."""
        m = self.model
        if req.guidance_scale_2 is not None and not self.two_experts:
            raise RequestRejected("guidance_scale_2", "this model has one expert; use guidance_scale")
        g1 = req.guidance_scale if req.guidance_scale is not None else m.guidance_scale
        if not self.two_experts:
            return g1, None
        if req.guidance_scale_2 is not None:
            g2 = req.guidance_scale_2
        else:
            g2 = req.guidance_scale if req.guidance_scale is not None else m.guidance_scale_2
        if g1 <= 1.0 < (g2 or 0.0):
            # WanPipeline runs the unconditional pass only when guidance_scale > 1, for both experts
            raise RequestRejected("guidance_scale_2", f"{g2} needs classifier-free guidance, which runs only when "
                                                      f"guidance_scale > 1 (got {g1}); raise guidance_scale too")
        return g1, g2

    def run(self, args: ResolvedRequest, out_dir: Path) -> Any:
        """Render `args` into `out_dir` (video.mp4 + frame0.png); returns a RenderResult."""
        from gpubake.provisioning.render import render

        return render(
            self.pipeline, args.prompt, args.height, args.width, args.frames, args.steps, args.seed, out_dir,
            fps=self.model.fps, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
            guidance_scale_2=args.guidance_scale_2, recipe=self.recipe, cfg_until=args.cfg_until,
            step_cache=args.step_cache,
        )
