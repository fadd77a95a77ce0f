"""Put a sampling recipe (`models.Recipe`) on a loaded diffusers Wan pipeline.

WanPipeline (diffusers 0.42.1) takes no `timesteps` or `sigmas`: it calls
`scheduler.set_timesteps(num_inference_steps)` and, with two experts, runs `transformer`
while `t >= boundary_ratio * 1000`. So a recipe is the scheduler and the boundary:

- "unipc": the checkpoint's own UniPCMultistepScheduler (flow prediction), its
  `flow_shift` set to the recipe's shift (the Wan reference's sample_shift);
- "euler": a FlowMatchEulerDiscreteScheduler at the recipe's shift whose
  `set_timesteps` always lays out the recipe's fixed sigmas. That is LightX2V's
  Wan22StepDistillScheduler exactly: the same shifted sigmas (t / 1000 for t in
  denoising_step_list, then `shift * s / (1 + (shift - 1) * s)`), timesteps `1000 * sigma`,
  and its step `x - sigma * v + sigma_next * v` is the Euler step `x + (sigma_next - sigma) * v`,
  kept in float32 as LightX2V keeps its latents;
- the boundary: `boundary_ratio` into the pipeline's config (a step index becomes the ratio
  `models.boundary_ratio_for_step` derives).

The checkpoint's scheduler is kept aside the first time, so recipes can follow one
another on the same pipeline (the bench runs the 4-step and the 40-step recipe in one
process).
"""

from __future__ import annotations

import functools
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.provisioning.models import TRAIN_TIMESTEPS, Recipe

_ORIGINAL = "_gpubake_checkpoint_scheduler"


class SamplingError(GpubakeError):
    """A recipe the pipeline cannot run, or a step count a fixed schedule does not have."""


def check_steps(recipe: Recipe, steps: int) -> None:
    """A fixed (step-distilled) schedule runs exactly its own number of steps."""
    if recipe.fixed_steps and steps != recipe.steps:
        raise SamplingError(f"steps={steps}: recipe {recipe.name} is a fixed {recipe.steps}-step schedule "
                            f"(timesteps {list(recipe.timesteps or ())})")


@functools.cache
def _fixed_schedule_class() -> type:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FixedScheduleEulerScheduler(FlowMatchEulerDiscreteScheduler):
        """FlowMatchEulerDiscreteScheduler that always samples `fixed_sigmas` (unshifted)."""

        fixed_sigmas: tuple[float, ...] = ()

        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                          mu: float | None = None, timesteps: Any = None) -> None:
            if sigmas is None and timesteps is None and self.fixed_sigmas:
                if num_inference_steps not in (None, len(self.fixed_sigmas)):
                    raise SamplingError(f"steps={num_inference_steps}: this schedule has {len(self.fixed_sigmas)} steps")
                num_inference_steps, sigmas = None, list(self.fixed_sigmas)
            super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)

        def step(self, model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            # diffusers casts the new latents to the model output's dtype (BF16); LightX2V keeps float32
            return super().step(model_output.to(torch.float32), timestep, sample, *args, **kwargs)

    return FixedScheduleEulerScheduler


def scheduler_for(recipe: Recipe, checkpoint_scheduler: Any) -> Any:
    """The scheduler that samples `recipe`, from the checkpoint's own when it fits."""
    if recipe.sampler == "euler":
        cls = _fixed_schedule_class()
        sched = cls(num_train_timesteps=TRAIN_TIMESTEPS, shift=recipe.shift)
        sched.fixed_sigmas = recipe.sigmas() or ()
        return sched
    from diffusers import UniPCMultistepScheduler

    config = getattr(checkpoint_scheduler, "config", None)
    if isinstance(checkpoint_scheduler, UniPCMultistepScheduler) and config is not None:
        return UniPCMultistepScheduler.from_config(config, flow_shift=recipe.shift)
    # a checkpoint with another scheduler: the flow-prediction UniPC diffusers' Wan models ship
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=recipe.shift,
                                   num_train_timesteps=TRAIN_TIMESTEPS)


def apply_recipe(pipe: Any, recipe: Recipe) -> None:
    """Give `pipe` the recipe's scheduler and expert boundary (before a render)."""
    original = getattr(pipe, _ORIGINAL, None)
    if original is None:
        original = pipe.scheduler
        setattr(pipe, _ORIGINAL, original)  # not a pipeline component: no config entry
    pipe.scheduler = scheduler_for(recipe, original)
    config = getattr(pipe, "config", None)
    if recipe.boundary_ratio is not None:
        if config is None or "boundary_ratio" not in config or getattr(pipe, "transformer_2", None) is None:
            raise SamplingError(f"recipe {recipe.name} switches between two experts; this pipeline has one")
        if config.boundary_ratio != recipe.boundary_ratio:
            pipe.register_to_config(boundary_ratio=recipe.boundary_ratio)
