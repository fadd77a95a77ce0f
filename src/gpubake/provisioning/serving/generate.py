"""Turn a validated request into a render: defaults, limits, output folder.

One class for both front ends (the HTTP worker and the RunPod serverless handler), so
a request means the same clip whichever way it arrives.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.provisioning.serving.schemas import GenerateRequest

# Smallest per-request work cap (pixels x frames): lets the tiny demo model take a
# 256x256x17 clip although its defaults are far smaller.
MIN_WORK_CAP = 256 * 256 * 17


class RequestRejected(GpubakeError):
    """A well-formed request this model cannot serve (too large); answered with 422."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RenderArgs:
    """A request with every default filled in: exactly what `render` will be called with."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    frames: int
    steps: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Generator:
    """Holds the loaded pipeline and the model's defaults and limits."""

    def __init__(self, pipeline: Any, model: Any, *, max_steps: int = 100) -> None:
        self.pipeline = pipeline
        self.model = model  # provisioning.models.ModelInfo
        self.max_steps = max_steps
        self.work_cap = max(model.width * model.height * model.num_frames, MIN_WORK_CAP)

    def defaults(self) -> dict[str, Any]:
        m = self.model
        return {"size": f"{m.width}x{m.height}", "frames": m.num_frames, "steps": m.num_inference_steps,
                "fps": m.fps, "max_pixels_x_frames": self.work_cap}

    def resolve(self, req: GenerateRequest, *, rng: random.Random | None = None) -> RenderArgs:
        """Fill defaults and refuse what exceeds this model's cap (RequestRejected)."""
        m = self.model
        width, height = req.width_height or (m.width, m.height)
        frames = req.frames or m.num_frames
        steps = req.steps or m.num_inference_steps
        if steps > self.max_steps:
            raise RequestRejected("steps", f"at most {self.max_steps}, got {steps}")
        work = width * height * frames
        if work > self.work_cap:
            raise RequestRejected(
                "size" if req.size else "frames",
                f"{width}x{height}x{frames} frames is {work} pixel-frames; this model serves at most {self.work_cap}",
            )
        seed = req.seed if req.seed is not None else (rng or random.SystemRandom()).randrange(2**32)
        return RenderArgs(req.prompt, req.negative_prompt, width, height, frames, steps, seed)

    def run(self, args: RenderArgs, out_dir: Path) -> Any:
        """Render `args` into `out_dir` (video.mp4 + frame0.png); returns a RenderResult."""
        from gpubake.provisioning.render import render

        return render(
            self.pipeline, args.prompt, args.height, args.width, args.frames, args.steps, args.seed, out_dir,
            fps=self.model.fps, negative_prompt=args.negative_prompt,
        )
