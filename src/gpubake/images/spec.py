"""The image spec: one TOML file per published image, checked before anything is built.

Three steps kept apart (as Replicate cog's pkg/config does), so each can be tested and
reused alone:

- `load_toml(path)`   bytes -> dict (tomllib; a syntax error names file, line, column)
- `parse_spec(data)`  dict -> `ImageSpec` (pydantic v2, extra fields forbidden, strict
  types: a mistyped or misspelt field fails instead of being coerced or ignored)
- `validate_spec(spec)` what needs more than the dict: name == file stem, the lock file
  exists and pins every requirement with a hash, and the (torch, cuda) compatibility
  tables (`gpubake.images.compat`) can run every requested GPU architecture
  (`check_compat`).

`load_spec(path)` runs all three. Every failure is a `SpecError` of ONE line naming the
spec file and the dotted field path, e.g.
`catalog/demo.toml: base.image: must be pinned by digest (...@sha256:<64 hex>)`.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from gpubake.errors import SpecError
from gpubake.images import compat
from gpubake.provisioning.facts import GPU_ARCHS, TARGETS, GpuArch, Target, version_key
from gpubake.secrets import is_secret_name

__all__ = [  # TARGETS, GPU_ARCHS and their types are the image facts' (one definition), re-exported
    "CATALOG_DIR", "GPU_ARCHS", "QUANTIZED", "SCHEMA_FILE", "SCHEMA_VERSION", "TARGETS", "Base", "Bootstrap", "GpuArch", "ImageSpec",
    "Model", "Port", "Python", "Runtime", "Target", "check_compat", "check_lock", "display_path", "json_schema",
    "json_schema_text", "load_spec", "load_toml", "parse_spec", "validate_spec",
]

SCHEMA_VERSION = 1
# The quantized formats gpubake bakes (model.quantization) -> their display names; "bf16" is
# the unquantized checkpoint as stored. One table, so a new format is one line here.
QUANTIZED = {"nvfp4": "NVFP4", "fp8": "FP8"}
CATALOG_DIR = Path(__file__).parent / "catalog"  # the shipped specs (`gpubake.images.catalog`)

# An OCI reference pinned by digest: [registry/]repo[:tag]@sha256:<64 hex>.
_DIGEST_REF = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"@sha256:(?P<digest>[0-9a-f]{64})$"
)
# Every string of a spec reaches a template, a label, a shell or an HTTP API: each field
# has a pattern of the characters its kind of value needs, and nothing else. Templates
# quote on top of that (shquote, HCL and Containerfile strings: gpubake.images.render).
_URL_PATH = r"[A-Za-z0-9._~/%+=,-]*"
MODEL_SOURCE_PATTERN = (
    r"^(generate:tiny"
    r"|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/" + _URL_PATH + r")?"
    r"|https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/" + _URL_PATH + r")?(\?[A-Za-z0-9._~%+=,&-]*)?)$"
)
_MODEL_SOURCE = re.compile(MODEL_SOURCE_PATTERN)
# Printable text on one line: no NUL, newline or other control character (C0, DEL, C1),
# no Unicode line separator.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
# An absolute POSIX path of plain components (no `.`/`..`, no hidden component).
ABS_PATH_PATTERN = r"^/$|^(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+$"
# One argv word of the entrypoint: a path or an option, no whitespace or shell syntax.
ARG_PATTERN = r"^[A-Za-z0-9_./:=@%+,-]+$"
ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
ENV_KEY_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"
UNPINNED = "UNPINNED"  # a revision not known yet: the spec loads (render, dry run), build and publish refuse
# a branch or tag moves; a commit does not (or the placeholder, which `check_pinned` refuses to bake)
_HF_COMMIT = re.compile(rf"^hf://[^@]+@([0-9a-f]{{40}}|{UNPINNED})$")
# An apt/debootstrap mirror: http(s), host, path; no spaces, quotes or shell syntax.
_MIRROR = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)*/?$")

Name = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, StringConstraints(pattern=TEXT_PATTERN, max_length=4096)]


class _Strict(BaseModel):
    """Base of every spec table: unknown keys are errors, values are never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Bootstrap(_Strict):
    """A base image the project builds itself from Debian packages (offline-capable)."""

    suite: Annotated[str, StringConstraints(pattern=r"^[a-z]+$")] = Field(description="Debian suite, e.g. bookworm")
    packages: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]] = Field(
        default_factory=list, description="Debian packages installed into the base"
    )


class Base(_Strict):
    """Exactly one of `image` (a registry reference pinned by digest) or `bootstrap`."""

    image: str | None = Field(default=None, description="registry/repo[:tag]@sha256:<64 hex>")
    bootstrap: Bootstrap | None = None
    apt_mirror: str | None = Field(
        default=None,
        description="apt mirror of the build's apt steps, dated (https://snapshot.debian.org/archive/debian/<YYYYMMDDTHHMMSSZ>, "
        "https://snapshot.ubuntu.com/ubuntu/<...>): debootstrap's for a bootstrap base, step 10's for an image base",
    )

    @field_validator("apt_mirror")
    @classmethod
    def _mirror(cls, value: str | None) -> str | None:
        if value is not None and not _MIRROR.match(value):
            raise ValueError(f"must be an http(s) mirror URL such as https://snapshot.debian.org/archive/debian/20261115T000000Z, got {value!r}")
        return value

    @field_validator("image")
    @classmethod
    def _pinned(cls, value: str | None) -> str | None:
        if value is not None and not _DIGEST_REF.match(value):
            raise ValueError(f"must be pinned by digest (…@sha256:<64 hex>), got {value!r}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Base:
        if (self.image is None) == (self.bootstrap is None):
            raise ValueError("set exactly one of base.image or [base.bootstrap]")
        return self

    @property
    def image_tag(self) -> str | None:
        """The tag part of a pinned image reference (e.g. `12.8.1-cudnn-runtime-ubuntu24.04`)."""
        match = _DIGEST_REF.match(self.image or "")
        return match.group("tag") if match else None


class Python(_Strict):
    """The image's Python and its locked requirements."""

    version: Annotated[str, StringConstraints(pattern=r"^3\.[0-9]{1,2}$")] = Field(description="e.g. 3.11")
    lock: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_./-]+\.(txt|lock)$")] = Field(
        description="pip requirements with --hash, relative to the spec's directory"
    )

    @field_validator("lock")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"must be a path inside the catalog directory, got {value!r}")
        return value


class Model(_Strict):
    """The checkpoint baked into the image's last layer(s)."""

    id: Annotated[str, StringConstraints(pattern=ID_PATTERN)] = Field(description="key of the provisioning model registry")
    quantization: Literal["nvfp4", "fp8", "bf16"] = Field(
        description="nvfp4: 4-bit weights (NVFP4 blocks of 16, FP8 scales); fp8: FP8 E4M3 weights with one fp32 scale "
        "per output row, run W8A8 on FP8 tensor cores, the peer stack's precision: about 2x the NVFP4 bytes, for "
        ">= 80 GB cards (set min_gpu_memory_gb); bf16: the checkpoint as stored",
    )
    policy: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$")] = "default"
    source: str = Field(
        description="generate:tiny | hf://org/repo@rev | s3://bucket/prefix | https://... (no credentials)",
        json_schema_extra={"pattern": MODEL_SOURCE_PATTERN},
    )
    sha256: Sha256 | None = Field(default=None, description="sha256 of the checkpoint manifest")
    format: Literal["lightx2v", "modelopt", "comfy"] | None = Field(
        default=None, description="source is another tool's NVFP4 (lightx2v, modelopt, comfy) or FP8 (lightx2v, comfy) "
        "checkpoint, baked with `gpubake import --format`; quantization names its precision (nvfp4 | fp8)")
    base: str | None = Field(default=None, description="with format: the diffusers checkpoint giving the text "
                             "encoder, VAE, tokenizer and configs, hf://org/repo@<40-hex revision>")
    files: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.*?/\[\]-]+$")]] | None = Field(
        default=None, min_length=1, description="with format: the source's files to fetch (globs), default all")
    at: Literal["build", "boot"] = Field(
        default="build",
        description="build: the weights are the image's last layers; boot: start.sh fetches them into the volume "
        "(same verified fetch) and the image holds no weights",
    )

    @field_validator("id")
    @classmethod
    def _registered(cls, value: str) -> str:
        from gpubake.errors import GpubakeError
        from gpubake.provisioning.models import get_model  # the registry: data, no heavy imports

        try:
            get_model(value)
        except GpubakeError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("source", "base")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _MODEL_SOURCE.match(value):
            raise ValueError(
                "must be generate:tiny, hf://org/repo@<commit>, s3://bucket/prefix or https://host/path "
                f"(URL characters only), got {value!r}"
            )
        if value.startswith("hf://") and not _HF_COMMIT.match(value):
            raise ValueError(f"must pin a commit (hf://org/repo@<40 hex>, or @{UNPINNED} until known): a branch or "
                             f"tag moves under the cache, got {value!r}")
        from gpubake.secrets import REDACTED, redact_url

        if redact_url(value) != value:  # a token-like query value (userinfo cannot pass the pattern)
            raise ValueError(
                f"{redact_url(value).replace(REDACTED, '...')} carries a credential, which would be baked into "
                "the image; give it to the build in the environment (HF_TOKEN, AWS_*) instead"
            )
        return value

    @model_validator(mode="after")
    def _imported(self) -> Model:
        if self.format is None:
            if self.base is not None or self.files is not None:
                raise ValueError("base and files go with format (an imported checkpoint)")
            return self
        from gpubake.provisioning.bake import import_precisions  # the importers' own table

        imported = import_precisions(self.format)
        if self.quantization not in imported or self.base is None:
            want = " or ".join(f'"{q}"' for q in imported)
            raise ValueError(f'format = "{self.format}" imports a quantized checkpoint: set quantization = {want} '
                             "(its precision) and base (its diffusers checkpoint)")
        for name, uri in (("source", self.source), ("base", self.base)):
            if not uri.startswith("hf://"):  # the field's own check pinned it (`_HF_COMMIT`)
                raise ValueError(f"{name}: an imported checkpoint's sources are pinned by revision "
                                 f"(hf://org/repo@<40-hex commit>, or @{UNPINNED} until known), got {uri!r}")
        return self

    @property
    def revision(self) -> str | None:
        """The pinned Hugging Face commit of an hf:// source (recorded in image.json)."""
        if not self.source.startswith("hf://"):
            return None
        rev = self.source.rpartition("@")[2]
        return None if rev == UNPINNED else rev

    @property
    def unpinned(self) -> list[str]:
        """Fields whose revision is the UNPINNED placeholder: nothing may be built or published from them."""
        return [n for n in ("source", "base") if (getattr(self, n) or "").endswith("@" + UNPINNED)]




def check_pinned(spec: ImageSpec) -> None:
    """Refuse (one line) a spec whose model sources still carry the UNPINNED placeholder."""
    for name in spec.model.unpinned:
        uri = getattr(spec.model, name)
        repo = uri.removeprefix("hf://").rpartition("@")[0]
        raise SpecError(f"{display_path(spec.source) if spec.source else '<spec>'}: model.{name}: {uri} is not pinned: "
                        f"replace {UNPINNED} with the commit of https://huggingface.co/{repo} to bake "
                        f"(python -c \"import huggingface_hub as h; print(h.HfApi().model_info('{repo}').sha)\")")


class Port(_Strict):
    port: int = Field(ge=1, le=65535)
    protocol: Literal["http", "tcp", "udp"]
    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]


class Runtime(_Strict):
    """How the marketplace runs the container."""

    ports: list[Port] = Field(default_factory=list)
    env: dict[Annotated[str, StringConstraints(pattern=ENV_KEY_PATTERN)], Text] = Field(default_factory=dict)
    entrypoint: list[Annotated[str, StringConstraints(pattern=ARG_PATTERN, max_length=256)]] = Field(min_length=1)
    container_disk_gb: int = Field(ge=1, le=4096)
    volume_disk_gb: int = Field(default=0, ge=0, le=65536)
    volume_mount: Annotated[str, StringConstraints(pattern=ABS_PATH_PATTERN, max_length=255)] = "/workspace"

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if is_secret_name(key):
                raise ValueError(f"{key} looks like a secret; secrets are set at launch, never baked into an image")
        return value

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: list[Port]) -> list[Port]:
        seen: set[tuple[int, str]] = set()
        for p in value:
            key = (p.port, "udp" if p.protocol == "udp" else "tcp")
            if key in seen:
                raise ValueError(f"port {p.port}/{key[1]} listed twice")
            seen.add(key)
        return value


class ImageSpec(_Strict):
    """One published image: what to build, for which GPUs, with which model."""

    schema_version: Literal[1]
    name: Name
    description: Annotated[str, StringConstraints(pattern=TEXT_PATTERN, min_length=1, max_length=500)]
    targets: list[Target] = Field(min_length=1)
    gpu_archs: list[GpuArch] = Field(default_factory=list)
    min_gpu_memory_gb: int | None = Field(
        default=None, ge=1, le=4096,
        description="the smallest GPU memory (GB, as marketplaces list it) the image is offered on and launched on: "
        "publish and launch refuse a smaller GPU, and offer searches filter by it",
    )
    cpu_ok: bool = False
    cuda: Annotated[str, StringConstraints(pattern=r"^(none|[0-9]{2}\.[0-9])$")] = Field(
        description='CUDA runtime of the image and of its torch wheel ("12.8" -> cu128); "none" for CPU-only'
    )
    torch: Annotated[str, StringConstraints(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")] = Field(description="torch release")
    base: Base
    python: Python
    model: Model
    runtime: Runtime

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("targets", "gpu_archs")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"listed twice: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _some_device(self) -> ImageSpec:
        if not self.gpu_archs and not self.cpu_ok:
            raise ValueError("gpu_archs is empty and cpu_ok is false: the image could run nowhere")
        if self.min_gpu_memory_gb is not None and self.cuda == "none":
            raise ValueError('min_gpu_memory_gb: a CPU-only image (cuda = "none") runs on no GPU')
        return self

    @property
    def source(self) -> Path | None:
        """The TOML file this spec was loaded from (None when parsed from a dict)."""
        return self._source

    @property
    def lock_path(self) -> Path:
        """The lock file, resolved against the spec's directory."""
        base_dir = self._source.parent if self._source else Path.cwd()
        return base_dir / self.python.lock


# -------------------------------------------------------------------- error text


def _loc(loc: tuple[Any, ...]) -> str:
    """Dotted field path; a key that is not a plain name (a hostile env key) is shown quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += "[key]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def _message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return "unknown field (misspelt? see `gpubake spec-schema`)"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"must be one of {expected}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return f"invalid value {err.get('input')!r} (expected pattern {err.get('ctx', {}).get('pattern')})"
    msg = str(err.get("msg", "invalid"))
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    value = err.get("input")
    if kind.endswith("_type"):
        return f"{msg}, got {type(value).__name__} {value!r}"[:300]
    if isinstance(value, (str, int, float, bool)):
        msg = f"{msg}, got {value!r}"
    return msg[:300]


def _spec_error(source: str, exc: ValidationError) -> SpecError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = _loc(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    prefix = f"{source}: {where}: " if where else f"{source}: "
    return SpecError(f"{prefix}{_message(first)}{more}")


def display_path(path: Path) -> str:
    """Short, stable name for a spec file in error messages (catalog/x.toml or the path given)."""
    path = Path(path)
    try:
        return str(Path("catalog") / path.resolve().relative_to(CATALOG_DIR.resolve()))
    except ValueError:
        return str(path)


# -------------------------------------------------------------------- the three steps


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read and parse a spec file; syntax errors name the file, line and column."""
    path = Path(path)
    shown = display_path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{shown}: no such spec file") from None
    except OSError as exc:
        raise SpecError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"{shown}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{shown}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level: [[[[...]]]] 600 deep
        raise SpecError(f"{shown}: invalid TOML: arrays or tables nested too deeply") from None


def parse_spec(data: Any, *, source: str = "<spec>") -> ImageSpec:
    """Turn a parsed TOML document into an `ImageSpec` (structure and types only)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a TOML table, got {type(data).__name__}")
    try:
        return ImageSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(source, exc) from None
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: never a traceback for input
        raise SpecError(f"{source}: {exc}") from None


_HASH_LINE = re.compile(r"--hash=sha256:[0-9a-f]{64}")
_REQ_START = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*==\s*[^\s;\\]+")


def check_lock(path: Path, *, source: str) -> list[str]:
    """Every requirement in the lock is pinned with `==` and carries a sha256 hash.

    Returns the pinned `name==version` strings (for compat cross-checks). pip's
    `--require-hashes` would refuse the lock at build time anyway; checking here turns a
    late build failure into an early one-line error.
    """
    shown_lock = f"{source}: python.lock"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{shown_lock}: {path.name} not found next to the spec ({path})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{shown_lock}: cannot read {path}: {exc}") from None
    # Join backslash continuations into logical requirement lines.
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    if buf.strip():
        logical.append(buf.strip())
    pins: list[str] = []
    for line in logical:
        if line.startswith("-"):  # options such as --index-url / --only-binary
            continue
        match = _REQ_START.match(line)
        if not match:
            raise SpecError(f"{shown_lock}: {path.name}: requirement not pinned with ==: {line.split()[0]!r}")
        if not _HASH_LINE.search(line):
            raise SpecError(f"{shown_lock}: {path.name}: {match.group(0).replace(' ', '')} has no --hash=sha256:")
        pins.append(match.group(0).replace(" ", ""))
    if not pins:
        raise SpecError(f"{shown_lock}: {path.name} pins no requirements")
    return pins


def contained_lock(spec: ImageSpec, source: str = "<spec>") -> Path:
    """The lock's real path, refused when it (or a symlink on the way) leaves the spec's directory.

    Compared as resolved paths, not strings: `locks/x.txt` may be a symlink to /etc/shadow,
    and `/srv/catalog-old` starts with the string `/srv/catalog`.
    """
    base = (spec.source.parent if spec.source else Path.cwd()).resolve()
    real = spec.lock_path.resolve()
    if not real.is_relative_to(base):
        raise SpecError(f"{source}: python.lock: {spec.python.lock} leads out of {base} (to {real}); keep the lock beside the spec")
    return real


def validate_spec(spec: ImageSpec, *, path: Path | None = None) -> ImageSpec:
    """Checks that need the file system or the compat tables; raises `SpecError`."""
    path = path or spec.source
    source = display_path(path) if path else "<spec>"
    if path is not None and spec.name != Path(path).stem:
        raise SpecError(f"{source}: name: {spec.name!r} must equal the file name stem {Path(path).stem!r}")
    pins = check_lock(contained_lock(spec, source), source=source)
    check_compat(spec, source=source, pins=pins)
    check_target_env(spec, source=source)
    return spec


# Vast.ai's env string has no escapes (vast-cli `vastai/utils.py` smart_split/parse_env):
# a value holding one of these cannot reach a Vast.ai instance whole (marketplace.payload).
VAST_ENV_UNCARRIABLE = "'\"\n\r"


def check_target_env(spec: ImageSpec, *, source: str) -> None:
    """A spec built for Vast.ai must have env values its env string can carry, refused at
    load (one line naming file and key) rather than when a template is rendered."""
    if "vastai" not in spec.targets:
        return
    for key, value in sorted(spec.runtime.env.items()):
        if any(c in value for c in VAST_ENV_UNCARRIABLE):
            raise SpecError(f"{source}: runtime.env.{key}: Vast.ai's env string cannot carry quotes or line breaks "
                            "(targets include vastai)")


def check_compat(spec: ImageSpec, *, source: str, pins: list[str] | None = None) -> None:
    """Fail (one line naming file and field) when the spec asks for what it cannot run."""
    archs = list(spec.gpu_archs)
    if spec.cuda == "none":
        if archs:
            raise SpecError(
                f'{source}: gpu_archs: {", ".join(archs)} need a CUDA build, but cuda = "none" (CPU-only image)'
            )
        if not spec.cpu_ok:
            raise SpecError(f'{source}: cpu_ok: cuda = "none" builds a CPU-only image; set cpu_ok = true')
    else:
        try:
            compat.min_driver(spec.cuda)
            build = compat.wheel_archs(spec.torch, spec.cuda)
        except SpecError as exc:
            raise SpecError(f"{source}: {exc}") from None
        for i, arch in enumerate(archs):
            need = compat.first_cuda(arch)
            if need and version_key(spec.cuda) < version_key(need):
                raise SpecError(f"{source}: gpu_archs[{i}]: {arch} needs CUDA {need}+ but cuda = {spec.cuda!r}")
            if not compat.arch_runs(arch, build["sass"], build["ptx"]):
                have = ", ".join("sm_" + c.replace(".", "") for c in build["sass"])
                raise SpecError(
                    f"{source}: gpu_archs[{i}]: torch {spec.torch}+{compat.wheel_tag(spec.cuda)} cannot run {arch} "
                    f"(its wheel carries {have})"
                )
        _check_base_cuda(spec, source)
    _check_torch_pin(spec, source, pins or [])


def _check_base_cuda(spec: ImageSpec, source: str) -> None:
    """An nvidia/cuda base image's tag must carry the spec's CUDA version."""
    if spec.base.image is None or "nvidia/cuda" not in spec.base.image:
        return
    tag = spec.base.image_tag or ""
    if not (tag == spec.cuda or tag.startswith(spec.cuda + ".") or tag.startswith(spec.cuda + "-")):
        raise SpecError(f"{source}: base.image: tag {tag!r} is not CUDA {spec.cuda} (cuda = {spec.cuda!r})")


def _check_torch_pin(spec: ImageSpec, source: str, pins: list[str]) -> None:
    """If the lock pins torch, it must be the spec's torch release (local tag like +cu128 allowed)."""
    for pin in pins:
        name, _, version = pin.partition("==")
        if name.lower() == "torch":
            public, _, local = version.partition("+")
            if public != spec.torch:
                raise SpecError(f"{source}: torch: {spec.torch!r} but {spec.python.lock} pins torch=={version}")
            want = compat.wheel_tag(spec.cuda)
            if local and local != want:
                raise SpecError(f"{source}: cuda: {spec.cuda!r} but {spec.python.lock} pins torch=={version}")


def load_spec(path: str | Path) -> ImageSpec:
    """Load, parse and validate one spec file (the API the rest of gpubake uses)."""
    path = Path(path)
    source = display_path(path)
    spec = parse_spec(load_toml(path), source=source)
    spec._source = path.resolve()
    return validate_spec(spec, path=path)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the spec (for editors and for reviewing the format)."""
    schema = ImageSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://gpubake.dev/schemas/image-spec-v1.json"
    return schema


def json_schema_text() -> str:
    """The schema as written to `images/data/spec.schema.json` (sorted keys, stable)."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


SCHEMA_FILE = Path(__file__).parent / "data" / "spec.schema.json"


if __name__ == "__main__":  # python -m gpubake.images.spec  -> regenerate the schema file
    from gpubake.fsutil import write_text_atomic

    write_text_atomic(SCHEMA_FILE, json_schema_text())
    print(SCHEMA_FILE)
