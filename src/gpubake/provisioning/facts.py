"""`image.json`: what an image is, computed once at build, read at boot.

The build side (`gpubake.images.render.image_facts`) derives an `ImageFacts` from the
image spec and the compatibility tables and writes it into the build context; the image
installs it at `/opt/gpubake/image.json`. The boot self-test and the service read it back
with `ImageFacts.read` and never load the spec, the catalog or the tables: everything the
boot decides on (GPU architectures, CUDA and its minimum driver, the model and its
quantization recipe, the throughput-table key) is in this one file.

The rules the boot applies to those facts (does this GPU run the image's code, does this
driver run its CUDA) live here too, so the build's compatibility checks
(`gpubake.images.compat`) and the boot apply one definition of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gpubake import envs
from gpubake.errors import GpubakeError
from gpubake.fsutil import write_text_atomic
from gpubake.kernels.archs import parse_capability  # the one table's rule: 'sm_89' / '8.9' -> (8, 9)

SCHEMA_VERSION = 1
Target = Literal["runpod", "vastai"]
TARGETS: tuple[str, ...] = get_args(Target)
GpuArch = Literal["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"]
GPU_ARCHS: tuple[str, ...] = get_args(GpuArch)

INSTALL_PREFIX = "/opt/gpubake"  # where an image holds gpubake, its venv, start.sh and the facts
FACTS_FILE = "image.json"
FACTS_ENV = "GPUBAKE_IMAGE_FACTS"  # overrides <prefix>/image.json (tests, a moved install)
IMAGE_ENV = "GPUBAKE_IMAGE"  # a catalog name, for hosts without an image.json (see `resolve`)


class FactsError(GpubakeError):
    """The image facts file is missing or invalid, or no image was named."""


# ----------------------------------------------------------------- the rules


def version_key(version: str) -> tuple[int, ...]:
    """'580.65.06' -> (580, 65, 6): driver and CUDA versions compare numerically."""
    return tuple(int(p) for p in version.split("."))


def arch_runs(arch: str, sass: list[str], ptx: list[str]) -> bool:
    """True when a GPU of `arch` can execute code compiled for `sass` / `ptx` capabilities.

    SASS of the same major and an equal or lower minor runs (cubins are binary compatible
    within a major: sm_86 code runs on sm_89); PTX of an equal or lower capability is
    JIT-compiled by the driver (CUDA C++ Programming Guide, "Binary Compatibility", "PTX
    Compatibility").
    """
    major, minor = parse_capability(arch)
    for cc in sass:
        c_major, c_minor = parse_capability(cc)
        if c_major == major and c_minor <= minor:
            return True
    return any(parse_capability(cc) <= (major, minor) for cc in ptx)


class _Facts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DriverRequirement(_Facts):
    """Minimum Linux host driver for the image's CUDA."""

    toolkit: str  # driver of the toolkit release (what NVIDIA lists for it)
    minor_compat: str  # floor under CUDA minor version compatibility

    def satisfied_by(self, driver: str, *, allow_minor_compat: bool = False) -> bool:
        floor = self.minor_compat if allow_minor_compat else self.toolkit
        return version_key(driver) >= version_key(floor)


# ----------------------------------------------------------------- the facts


class ModelFacts(_Facts):
    """The checkpoint baked into the image."""

    id: str
    quantization: Literal["nvfp4", "fp8", "bf16"]
    policy: str  # the quantization recipe (provisioning/policies.toml)
    source: str
    sha256: str | None = None
    # the sampling recipe ([recipes] of provisioning/models.toml) the boot renders and serves
    # with; None: the model's own (the build leaves it so: the model id names it)
    recipe: str | None = None
    revision: str | None = None  # the pinned Hugging Face commit of an hf:// source


class ImageFacts(_Facts):
    """Everything the boot needs to know about its image (the schema of `image.json`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    description: str
    gpubake_version: str
    target: Target | None  # None: derived from a spec on a dev box or a bare host, not built
    targets: list[Target]
    cuda: str  # CUDA runtime of the image; "none" for a CPU-only image
    torch: str
    gpu_archs: list[GpuArch]  # the architectures the image is built and checked for
    cpu_ok: bool  # the self-test may render on a CPU
    runnable_archs: list[GpuArch]  # every known architecture the image's torch wheel runs
    min_driver: DriverRequirement | None  # None for a CPU-only image
    model: ModelFacts
    model_dir: str | None  # the spec's GPUBAKE_MODEL_DIR (the image's ENV sets it too)
    throughput_key: str  # the self-test's row group in smoke_tests/data/throughput.json

    @model_validator(mode="after")
    def _cuda_needs_a_driver(self) -> ImageFacts:
        if (self.cuda == "none") != (self.min_driver is None):
            raise ValueError(f"min_driver: must be set exactly when cuda is not 'none' (cuda = {self.cuda!r})")
        return self

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ImageFacts:
        """Load `path`; a missing or invalid file is one `FactsError` line naming it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FactsError(f"{path}: no image facts file (build-image writes image.json; pass --facts PATH)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FactsError(f"{path}: cannot read image facts: {exc}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            if err.get("type") == "json_invalid":
                raise FactsError(f"{path}: not JSON: {err.get('msg')}") from None
            raise FactsError(f"{path}: {loc or 'image facts'}: {err.get('msg')}") from None

    def to_json(self) -> str:
        """The file's text: sorted keys, so the same image renders the same bytes."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.to_json())


# ----------------------------------------------------------------- finding them


def installed_path() -> Path:
    """Where an image holds its facts: `$GPUBAKE_IMAGE_FACTS`, else /opt/gpubake/image.json."""
    return Path(envs.raw(FACTS_ENV) or Path(INSTALL_PREFIX) / FACTS_FILE)


SpecFacts = Callable[[str], ImageFacts]
_spec_facts: SpecFacts | None = None


def provide_spec_facts(fn: SpecFacts | None) -> None:
    """Let `resolve` derive facts from a catalog name or spec file.

    Installed by the top-level command line (`gpubake.cli`, which sees both sides) for a
    dev box or a bare host, which have a spec but no image.json. The in-image side never
    imports the build side itself.
    """
    global _spec_facts
    _spec_facts = fn


def _from_spec(ref: str, flag: str) -> ImageFacts:
    if _spec_facts is None:
        raise FactsError(f"{flag}: naming an image spec needs the gpubake command line; pass --facts PATH (an image.json)")
    return _spec_facts(ref)


def resolve(facts: str | os.PathLike[str] | None = None, *, image: str | None = None,
            spec: str | os.PathLike[str] | None = None) -> ImageFacts:
    """The facts of the image this machine runs, in this order: --facts PATH, --spec PATH,
    --image NAME, $GPUBAKE_IMAGE_FACTS, /opt/gpubake/image.json, $GPUBAKE_IMAGE."""
    if facts:
        return ImageFacts.read(facts)
    if spec:
        return _from_spec(str(spec), "--spec")
    if image:
        return _from_spec(image, "--image")
    path = installed_path()
    if envs.raw(FACTS_ENV) or path.is_file():
        return ImageFacts.read(path)
    name = envs.raw(IMAGE_ENV)
    if name:
        return _from_spec(name, IMAGE_ENV)
    raise FactsError(
        f"no image facts ({path} not found) and no image spec: pass --image NAME or --spec PATH, "
        f"or set {IMAGE_ENV} (or --facts PATH, ${FACTS_ENV})"
    )
