"""Model registry: the Wan 2.2 checkpoints gpubake can bake, as data (models.toml).

Kept as TOML so adding a model (or fixing a default from a new model card) is a data
change reviewed on its own, not a code change. `get_model` is the only entry point.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources

from gpubake.errors import GpubakeError


class ModelError(GpubakeError):
    """Unknown model id or a malformed registry entry."""


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: where the weights live and how to run them by default."""

    id: str
    name: str
    task: str  # t2v | i2v | ti2v
    source: str  # hf://org/repo[@rev] | s3://... | https://... | generate:tiny
    pipeline: str  # diffusers pipeline class name
    experts: int  # 2 for the A14B mixture (high-/low-noise), 1 otherwise
    height: int
    width: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    num_layers: int
    hidden_dim: int
    ffn_dim: int
    boundary_ratio: float | None = None
    guidance_scale_2: float | None = None
    expand_timesteps: bool = False
    negative_prompt: str = ""  # the file's top-level negative_prompt unless the entry has its own

    @property
    def expert_dirs(self) -> tuple[str, ...]:
        """Subfolders of the diffusers layout holding transformer experts."""
        return ("transformer", "transformer_2")[: self.experts]


@functools.cache
def _registry() -> dict[str, ModelInfo]:
    text = resources.files("gpubake.provisioning").joinpath("models.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    out: dict[str, ModelInfo] = {}
    for model_id, entry in data.get("models", {}).items():
        try:
            out[model_id] = ModelInfo(id=model_id, **{"negative_prompt": data.get("negative_prompt", ""), **entry})
        except TypeError as exc:  # a missing or unknown field in models.toml
            raise ModelError(f"models.toml: entry {model_id!r}: {exc}") from None
    return out


def list_models() -> list[ModelInfo]:
    """All registered models, in file order."""
    return list(_registry().values())


def get_model(model_id: str) -> ModelInfo:
    """The registry entry for `model_id`; a one-line error listing valid ids otherwise."""
    reg = _registry()
    if model_id not in reg:
        raise ModelError(f"unknown model id {model_id!r} (known: {', '.join(sorted(reg))})")
    return reg[model_id]
