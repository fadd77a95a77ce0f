"""Model registry: the Wan 2.2 checkpoints gpubake can bake and how each is sampled (models.toml).

Kept as TOML so adding a model or a recipe (or fixing a default from a new model card)
is a data change reviewed on its own, not a code change. A model names its default
sampling recipe (`[recipes.NAME]`: steps or explicit timesteps, shift, guidance per
expert or none, the expert boundary, negative prompt); `ModelInfo`'s sampling fields
(`num_inference_steps`, `guidance_scale`, ...) are that recipe's, so one file says them
once. `get_model`, `model_for` and `get_recipe` are the entry points.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gpubake.errors import GpubakeError

TRAIN_TIMESTEPS = 1000  # Wan's training scale: t = 1000 * sigma
SAMPLERS = ("unipc", "euler")


EXPERTS = ("transformer", "transformer_2")  # a Wan pipeline's expert slots (A14B: high-, then low-noise)


def experts_of(pipe: Any) -> dict[str, Any]:
    """The pipeline's experts present, by slot name (`transformer_2` may be None)."""
    return {n: m for n in EXPERTS if (m := getattr(pipe, n, None)) is not None}

class ModelError(GpubakeError):
    """Unknown model id or recipe, or a malformed registry entry."""


@dataclass(frozen=True)
class Recipe:
    """How a model is sampled: what `render` applies to the pipeline before it runs."""

    name: str
    sampler: str  # unipc | euler (SAMPLERS)
    steps: int  # the default step count; len(timesteps) when the schedule is fixed
    shift: float
    guidance_scale: float  # 1.0: no classifier-free guidance (one forward a step)
    guidance_scale_2: float | None = None  # the low-noise expert's (two experts only)
    timesteps: tuple[int, ...] | None = None  # fixed schedule, training scale, before the shift
    boundary_ratio: float | None = None  # high-noise expert while t >= ratio * 1000
    boundary_step: int | None = None  # the first low-noise step, when the recipe says it so
    negative_prompt: str | None = None  # None: the registry's
    about: str = ""
    cfg_until: float | None = None  # fraction of the steps that keep CFG (`cfg_truncation`); None: all

    @property
    def fixed_steps(self) -> bool:
        """A step-distilled schedule: the step count is part of the recipe."""
        return self.timesteps is not None

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def sigmas(self) -> tuple[float, ...] | None:
        """The fixed schedule as unshifted sigmas (t / 1000); the scheduler applies the shift."""
        return None if self.timesteps is None else tuple(t / TRAIN_TIMESTEPS for t in self.timesteps)

    def shifted_sigmas(self) -> tuple[float, ...] | None:
        """The sigmas the sampler visits: `shift * s / (1 + (shift - 1) * s)`, as
        FlowMatchEulerDiscreteScheduler (and LightX2V's scheduler) shift them."""
        base = self.sigmas()
        return None if base is None else tuple(self.shift * s / (1 + (self.shift - 1) * s) for s in base)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["timesteps"] = list(self.timesteps) if self.timesteps is not None else None
        d["cfg"] = self.cfg
        return d


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
    num_layers: int
    hidden_dim: int
    ffn_dim: int
    recipe: Recipe
    expand_timesteps: bool = False
    base: str | None = None  # the diffusers checkpoint an imported source needs (text encoder, VAE, ...)
    import_format: str | None = None  # `gpubake import --format` of `source`, when it is another tool's
    negative_prompt: str = ""  # the recipe's, else the file's top-level negative_prompt
    # the model's own runtime-plan levers per architecture family (models.toml's
    # [models.ID.runtime] table: family -> $GPUBAKE_RUNTIME syntax), over the architecture's
    # plan and under $GPUBAKE_RUNTIME (`runtime.plan_from_env`): what the checkpoint was made
    # for, on the families where it was measured
    runtime: tuple[tuple[str, str], ...] = ()

    def runtime_for(self, family: str) -> str:
        """The model's own levers on architecture family `family` ("" where it declares none)."""
        return dict(self.runtime).get(family, "")

    # The recipe's sampling settings, under the names the rest of gpubake reads.
    @property
    def num_inference_steps(self) -> int:
        return self.recipe.steps

    @property
    def guidance_scale(self) -> float:
        return self.recipe.guidance_scale

    @property
    def guidance_scale_2(self) -> float | None:
        return self.recipe.guidance_scale_2

    @property
    def flow_shift(self) -> float:
        return self.recipe.shift

    @property
    def boundary_ratio(self) -> float | None:
        return self.recipe.boundary_ratio

    @property
    def expert_dirs(self) -> tuple[str, ...]:
        """Subfolders of the diffusers layout holding transformer experts."""
        return EXPERTS[: self.experts]

    def with_recipe(self, recipe: str | Recipe | None) -> ModelInfo:
        """This model sampled with another recipe (None: its own)."""
        if recipe is None:
            return self
        r = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
        _check_fit(self.id, self.experts, r)
        neg = r.negative_prompt if r.negative_prompt is not None else _registry()[2]
        return dataclasses.replace(self, recipe=r, negative_prompt=neg)


# --------------------------------------------------------------------------- parsing

_RECIPE_KEYS = {f.name for f in dataclasses.fields(Recipe)} - {"name"}


def _fail(where: str, msg: str) -> ModelError:
    return ModelError(f"models.toml: {where}: {msg}")


def _number(where: str, key: str, value: Any, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise _fail(where, f"{key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _parse_recipe(name: str, entry: dict[str, Any]) -> Recipe:
    where = f"recipe {name!r}"
    unknown = sorted(set(entry) - _RECIPE_KEYS)
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_RECIPE_KEYS))})")
    sampler = entry.get("sampler")
    if sampler not in SAMPLERS:
        raise _fail(where, f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    shift = _number(where, "shift", entry.get("shift"), low=0.01, high=100.0)
    g1 = _number(where, "guidance_scale", entry.get("guidance_scale"), low=1.0, high=30.0)
    g2 = entry.get("guidance_scale_2")
    g2 = None if g2 is None else _number(where, "guidance_scale_2", g2, low=1.0, high=30.0)
    if g1 == 1.0 and g2 is not None and g2 > 1.0:
        raise _fail(where, "guidance_scale 1.0 (no CFG) with guidance_scale_2 > 1: diffusers would run no "
                           "unconditional pass for either expert")
    raw_ts, steps = entry.get("timesteps"), entry.get("steps")
    timesteps: tuple[int, ...] | None = None
    if raw_ts is not None:
        if steps is not None:
            raise _fail(where, "give steps or timesteps, not both (a fixed schedule has len(timesteps) steps)")
        if sampler != "euler":
            raise _fail(where, "explicit timesteps need sampler = \"euler\"")
        if (not isinstance(raw_ts, list) or not raw_ts
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 < t <= TRAIN_TIMESTEPS for t in raw_ts)
                or any(a <= b for a, b in zip(raw_ts, raw_ts[1:]))):
            raise _fail(where, f"timesteps must be strictly decreasing whole numbers in (0, {TRAIN_TIMESTEPS}], "
                               f"got {raw_ts!r}")
        timesteps = tuple(raw_ts)
        steps = len(timesteps)
    elif isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise _fail(where, f"steps must be a whole number in [1, 1000] (or give timesteps), got {steps!r}")
    ratio, bstep = entry.get("boundary_ratio"), entry.get("boundary_step")
    if ratio is not None and bstep is not None:
        raise _fail(where, "give boundary_ratio or boundary_step, not both")
    cut = entry.get("cfg_until")
    if cut is not None:
        cut = _number(where, "cfg_until", cut, low=0.0, high=1.0)
        if g1 == 1.0:
            raise _fail(where, "cfg_until truncates classifier-free guidance, and guidance_scale 1.0 runs none")
    recipe = Recipe(name=name, sampler=sampler, steps=steps, shift=shift, guidance_scale=g1, guidance_scale_2=g2,
                    timesteps=timesteps, negative_prompt=entry.get("negative_prompt"), about=str(entry.get("about", "")),
                    cfg_until=cut)
    if ratio is not None:
        recipe = dataclasses.replace(recipe, boundary_ratio=_number(where, "boundary_ratio", ratio, low=0.0, high=1.0))
    elif bstep is not None:
        if timesteps is None:
            raise _fail(where, "boundary_step needs explicit timesteps (use boundary_ratio with uniform steps)")
        if isinstance(bstep, bool) or not isinstance(bstep, int) or not 0 < bstep < len(timesteps):
            raise _fail(where, f"boundary_step must be a whole number in [1, {len(timesteps) - 1}], got {bstep!r}")
        recipe = dataclasses.replace(recipe, boundary_step=bstep, boundary_ratio=boundary_ratio_for_step(recipe, bstep))
    if (recipe.boundary_ratio is None) != (recipe.guidance_scale_2 is None):
        raise _fail(where, "guidance_scale_2 goes with a boundary (two experts), and a boundary with guidance_scale_2")
    return recipe


def boundary_ratio_for_step(recipe: Recipe, step: int) -> float:
    """The `boundary_ratio` that hands step `step` (and every later one) of a fixed schedule
    to the low-noise expert: halfway, in t, between the last high-noise step and it.

    diffusers' WanPipeline picks `transformer` while `t >= boundary_ratio * 1000`, with
    `t = 1000 * sigma'` (the shifted sigma) on the FlowMatch scheduler; LightX2V's MoE
    runner picks the high-noise model while `step_index < boundary_step_index`."""
    shifted = recipe.shifted_sigmas()
    if shifted is None or not 0 < step < len(shifted):
        raise ModelError(f"recipe {recipe.name!r}: no step {step} to put a boundary before")
    ratio = (shifted[step - 1] + shifted[step]) / 2
    return round(ratio, 6)


def _check_fit(model_id: str, experts: int, r: Recipe) -> None:
    if experts == 2 and r.boundary_ratio is None:
        raise ModelError(f"models.toml: model {model_id!r}: recipe {r.name!r} has no expert boundary, "
                         "and the model has two experts")
    if experts == 1 and r.boundary_ratio is not None:
        raise ModelError(f"models.toml: model {model_id!r}: recipe {r.name!r} has an expert boundary, "
                         "and the model has one expert")


@functools.cache
def _registry() -> tuple[dict[str, ModelInfo], dict[str, Recipe], str]:
    text = resources.files("gpubake.provisioning").joinpath("models.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    negative = data.get("negative_prompt", "")
    recipes = {name: _parse_recipe(name, entry) for name, entry in data.get("recipes", {}).items()}
    out: dict[str, ModelInfo] = {}
    sampling = ("num_inference_steps", "guidance_scale", "guidance_scale_2", "flow_shift", "boundary_ratio",
                "negative_prompt")
    for model_id, entry in data.get("models", {}).items():
        entry = dict(entry)
        moved = sorted(set(entry) & set(sampling))
        if moved:
            raise ModelError(f"models.toml: entry {model_id!r}: {moved[0]} belongs in its recipe ([recipes.NAME])")
        name = entry.pop("recipe", None)
        if name not in recipes:
            raise ModelError(f"models.toml: entry {model_id!r}: recipe {name!r} is not a [recipes] table "
                             f"(known: {', '.join(sorted(recipes))})")
        r = recipes[name]
        _check_fit(model_id, int(entry.get("experts", 0)), r)
        entry["runtime"] = _parse_runtime(model_id, entry.get("runtime", {}))
        neg = r.negative_prompt if r.negative_prompt is not None else negative
        try:
            out[model_id] = ModelInfo(id=model_id, recipe=r, negative_prompt=neg, **entry)
        except TypeError as exc:  # a missing or unknown field in models.toml
            raise ModelError(f"models.toml: entry {model_id!r}: {exc}") from None
    return out, recipes, negative


def _parse_runtime(model_id: str, table: Any) -> tuple[tuple[str, str], ...]:
    """models.toml's [models.ID.runtime]: architecture family -> lever string. The levers
    themselves are checked where a plan is made (`runtime.plan_from_env`), and by a test for
    every entry; the families here."""
    from gpubake.kernels.archs import ARCHS, CPU, OTHER_FAMILY

    families = sorted({a.family for a in ARCHS} | {CPU.family, OTHER_FAMILY})
    if not isinstance(table, dict):
        raise ModelError(f"models.toml: entry {model_id!r}: runtime must be a table of architecture "
                         f"family -> levers ({', '.join(families)})")
    for family, levers in table.items():
        if family not in families or not isinstance(levers, str):
            raise ModelError(f"models.toml: entry {model_id!r}: runtime.{family} = {levers!r}: a family "
                             f"({', '.join(families)}) = a lever string")
    return tuple(sorted(table.items()))


def list_models() -> list[ModelInfo]:
    """All registered models, in file order."""
    return list(_registry()[0].values())


def get_model(model_id: str) -> ModelInfo:
    """The registry entry for `model_id`; a one-line error listing valid ids otherwise."""
    reg = _registry()[0]
    if model_id not in reg:
        raise ModelError(f"unknown model id {model_id!r} (known: {', '.join(sorted(reg))})")
    return reg[model_id]


def list_recipes() -> list[Recipe]:
    return list(_registry()[1].values())


def get_recipe(name: str) -> Recipe:
    recipes = _registry()[1]
    if name not in recipes:
        raise ModelError(f"unknown sampling recipe {name!r} (known: {', '.join(sorted(recipes))})")
    return recipes[name]


def model_for(model_id: str, recipe: str | None = None) -> ModelInfo:
    """The model an image runs: its registry entry, sampled with `recipe` when the image
    facts name one (`ModelFacts.recipe`), else with the model's own."""
    return get_model(model_id).with_recipe(recipe)

