"""Render the build context of one image for one target into a directory, atomically.

The context is everything a builder (buildah, docker, packer) needs and nothing else: no
secret, no timestamp, no absolute host path, so the same spec and gpubake version render
the same bytes (files get sorted JSON keys and the build's SOURCE_DATE_EPOCH as mtime).
Layout (see docs/architecture.md "Build context"):

    Containerfile            templates/Containerfile.j2
    image.pkr.hcl            templates/image.pkr.hcl.j2 (Packer HCL2, docker builder)
    plugins.pkr.hcl          `required_plugins` for Packer >= 1.10 (rejected by 1.6.6)
    image.json               the image's facts (`provisioning.facts.ImageFacts`): read at boot
    requirements.lock.txt    the spec's python.lock (pip --require-hashes)
    app/gpubake-*.whl        gpubake itself, a wheel of the repository's tracked files (app_wheel)
    weights.json             the weight layer plan (images/layers.py): one folder model/<layer>/ each,
                             filled by model_layer.prepare_model (not rendered: the weights are not here)
    scripts/NN-*.sh          in-image provisioning scripts, run in name order
    start.sh                 templates/start.sh.j2 (when the self-test part ships it)
    marketplace/<target>.json  marketplace template payload (when that part is present)
    context.json             sha256 of every other file (written last)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from gpubake import __version__
from gpubake.errors import GpubakeError
from gpubake.fsutil import atomic_path, sha256_file
from gpubake.images import compat
from gpubake.images.app_wheel import AppWheel, place_app_wheel
from gpubake.images.spec import QUANTIZED, ImageSpec, contained_lock
from gpubake.provisioning.facts import FACTS_FILE, INSTALL_PREFIX, DriverRequirement, ImageFacts, ModelFacts

CONTAINERFILE_TEMPLATE = "Containerfile.j2"
PACKER_TEMPLATE = "image.pkr.hcl.j2"
START_TEMPLATE = "start.sh.j2"
PACKER_FILE = "image.pkr.hcl"
PACKER_PLUGINS_FILE = "plugins.pkr.hcl"
LOCK_FILE = "requirements.lock.txt"
IMAGE_JSON = FACTS_FILE  # the image's facts, installed at <INSTALL_PREFIX>/image.json
WEIGHTS_PLAN = "weights.json"  # the weight layer plan (gpubake.images.model_layer.PLAN_FILE)
MANIFEST = "context.json"
SCRIPTS_DIR = "scripts"
APP_DIR = "app"
WHEEL_NAME = f"gpubake-{__version__}-py3-none-any.whl"
RUNTIME_PATH = f"{INSTALL_PREFIX}/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Required by Packer >= 1.10, where the docker builder is no longer bundled. Kept out of
# image.pkr.hcl because Packer 1.6.6 rejects the block ("Unsupported block type").
PACKER_PLUGINS_HCL = """\
# For Packer >= 1.7 (required from 1.10, which bundles no plugins): `packer init .` then
# `packer build .`. Packer 1.6.x rejects this block: build image.pkr.hcl alone there.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    docker = {
      version = ">= 1.0.8"
      source  = "github.com/hashicorp/docker"
    }
  }
}
"""


class RenderError(GpubakeError):
    """A template is missing or needs a variable the renderer does not provide."""


def shquote(value: Any) -> str:
    """A POSIX shell word that bash reads back as exactly `value` (shlex.quote)."""
    import shlex

    return shlex.quote(str(value))


def comment_text(value: Any) -> str:
    """`value` for a comment line: a one-line JSON string (newlines and controls escaped)."""
    return json.dumps(str(value), ensure_ascii=True)


def containerfile_string(value: Any) -> str:
    """A Containerfile LABEL/ENV value: double-quoted, `\\` `"` `$` escaped (no substitution).

    A Containerfile has no escape for a line break, so control characters are refused
    (the spec's patterns refuse them first).
    """
    text = str(value)
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text):
        raise RenderError(f"Containerfile: value {text[:60]!r} holds a control character")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def containerfile_key(value: Any) -> str:
    """A LABEL/ENV key: letters, digits and `._-` only (never quoted, so never hostile)."""
    import re

    text = str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9._-]*", text):
        raise RenderError(f"Containerfile: key {text[:60]!r} is not a plain name")
    return text


def hcl_string(value: Any) -> str:
    """An HCL2 quoted string literal: JSON escapes, plus `${`/`%{` template sequences escaped."""
    text = json.dumps(str(value), ensure_ascii=False)
    return text.replace("${", "$${").replace("%{", "%%{")


def environment() -> jinja2.Environment:
    """The one Jinja2 environment for gpubake's templates: a missing variable is an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gpubake", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.filters["hcl"] = hcl_string
    env.filters["tojson_sorted"] = lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False)
    env.filters["shquote"] = shquote
    env.filters["comment"] = comment_text
    env.filters["cfstring"] = containerfile_string
    env.filters["cfkey"] = containerfile_key
    return env


def has_template(name: str) -> bool:
    return resources.files("gpubake").joinpath("templates", name).is_file()


def render_template(name: str, context: dict[str, Any]) -> str:
    """Render one template; a missing variable or template is a one-line `RenderError`."""
    try:
        return environment().get_template(name).render(**context)
    except jinja2.UndefinedError as exc:
        raise RenderError(f"templates/{name}: {exc.message}") from None
    except jinja2.TemplateNotFound:
        raise RenderError(f"templates/{name}: template not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"templates/{name}:{exc.lineno}: {exc.message}") from None


# ---------------------------------------------------------------------------- context


def local_repository(spec: ImageSpec) -> str:
    return f"localhost/gpubake/{spec.name}"


def base_reference(spec: ImageSpec, timestamp: int) -> tuple[str, bool]:
    """(reference of the base image, whether a builder pulls it from a registry)."""
    if spec.base.image is not None:
        return spec.base.image, True
    from gpubake.images import bootstrap  # the builder half's module: bootstrap base naming

    return bootstrap.inputs_for(spec, timestamp).ref(), False


def image_facts(spec: ImageSpec, target: str | None) -> ImageFacts:
    """`image.json`: what the boot needs of the spec and the compat tables, computed once.

    `target` is None for the facts of a spec on a dev box or a bare host (not a build).
    """
    min_driver: DriverRequirement | None = None
    runnable: list[str] = []
    if spec.cuda != "none":
        min_driver = compat.min_driver(spec.cuda)
        runnable = compat.runnable_archs(spec.torch, spec.cuda)
    m = spec.model
    return ImageFacts(
        name=spec.name,
        description=spec.description,
        gpubake_version=__version__,
        target=target,  # a marketplace name: ImageFacts refuses any other
        targets=list(spec.targets),
        cuda=spec.cuda,
        torch=spec.torch,
        gpu_archs=list(spec.gpu_archs),
        cpu_ok=spec.cpu_ok,
        runnable_archs=runnable,
        min_driver=min_driver,
        model=ModelFacts(id=m.id, quantization=m.quantization, policy=m.policy, source=m.source, sha256=m.sha256,
                         revision=m.revision),
        model_dir=spec.runtime.env.get("GPUBAKE_MODEL_DIR"),
        throughput_key=m.id,
    )


def labels(spec: ImageSpec, target: str) -> dict[str, str]:
    """OCI and gpubake labels of the image (sorted, no dates: reproducible)."""
    return {
        "ai.gpubake.cuda": spec.cuda,
        "ai.gpubake.gpu-archs": ",".join(spec.gpu_archs),
        "ai.gpubake.image": spec.name,
        "ai.gpubake.model": spec.model.id,
        "ai.gpubake.quantization": spec.model.quantization,
        "ai.gpubake.target": target,
        "ai.gpubake.torch": spec.torch,
        "org.opencontainers.image.description": spec.description,
        "org.opencontainers.image.title": f"gpubake/{spec.name}",
        "org.opencontainers.image.version": __version__,
    }


def scripts_source() -> Path | None:
    """The package folder holding the in-image provisioning scripts (builder half)."""
    path = Path(str(resources.files("gpubake.provisioning").joinpath("build")))
    return path if path.is_dir() else None


def script_names() -> list[str]:
    src = scripts_source()
    if src is None:
        return []
    return sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix == ".sh")


@dataclass
class PushTarget:
    """Where `--push` sends the image: server, repository (with server) and tag."""

    server: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, ref: str) -> PushTarget:
        """`REGISTRY/NAME:TAG` -> PushTarget; anything else is a one-line error naming --push."""
        import re

        match = re.fullmatch(r"(?P<server>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})", ref)
        if not match or ("." not in match["server"] and ":" not in match["server"] and match["server"] != "localhost"):
            raise GpubakeError(f"--push: {ref!r} is not REGISTRY/NAME:TAG (e.g. ghcr.io/me/demo:runpod)")
        return cls(server=match["server"], repository=f"{match['server']}/{match['name']}", tag=match["tag"])

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass
class RenderOptions:
    timestamp: int = 0
    push: PushTarget | None = None
    image_ref: str | None = None  # reference marketplaces will pull (defaults to push ref / local tag)
    weights: list[Any] | None = None  # the weight layers (images.layers.WeightLayer); None: model_layer.weights_plan


@dataclass
class RenderedContext:
    """What `render_context` wrote."""

    path: Path
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    skipped: list[str] = field(default_factory=list)  # optional parts not present in this checkout

    def to_json(self) -> dict[str, Any]:
        return {"context_dir": str(self.path), "files": self.files, "skipped": self.skipped}


def weight_layers(spec: ImageSpec, options: RenderOptions) -> list[Any]:
    """The weight layers to render: the options', else the plan of the model cache or the estimate."""
    if options.weights is not None:
        return list(options.weights)
    from gpubake.images import model_layer  # the builder half's module (makes nothing here)

    return model_layer.weights_plan(spec)


def template_context(spec: ImageSpec, target: str, options: RenderOptions, wheel: AppWheel | None = None) -> dict[str, Any]:
    """Variables every template gets (documented in docs/architecture.md "Build context").

    `wheel` is the gpubake wheel placed in the context (render_context builds it first);
    without it (a dry run's plan) the wheel's name is the expected one and its sha256 empty.
    """
    base_ref, base_pull = base_reference(spec, options.timestamp)
    layers = weight_layers(spec, options)
    tag = options.push.tag if options.push else target
    repository = options.push.repository if options.push else local_repository(spec)
    env = {**spec.runtime.env}
    # The build steps' environment names no target: both targets share every RUN layer.
    build_env = {
        "GPUBAKE_IMAGE": spec.name,
        "GPUBAKE_PREFIX": INSTALL_PREFIX,
        "GPUBAKE_PYTHON": spec.python.version,
        "SOURCE_DATE_EPOCH": str(options.timestamp),
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_NO_CACHE_DIR": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if spec.base.apt_mirror and spec.base.image is not None:  # a bootstrap base: debootstrap's mirror instead
        build_env["GPUBAKE_APT_MIRROR"] = spec.base.apt_mirror
    image_labels = labels(spec, target)
    exposes = [f"{p.port}/{'udp' if p.protocol == 'udp' else 'tcp'}" for p in spec.runtime.ports]
    cf = containerfile_string
    changes = [f"LABEL {containerfile_key(k)}={cf(v)}" for k, v in image_labels.items()]
    changes += [f"ENV {containerfile_key(k)}={cf(v)}" for k, v in sorted(env.items())]
    # Same runtime settings as the Containerfile's step 4 (PATH reaches the image's venv).
    changes += [f"ENV PATH={cf(RUNTIME_PATH)}", "ENV PYTHONUNBUFFERED=1"]
    changes += [f"EXPOSE {e}" for e in exposes]
    changes += [f"WORKDIR {INSTALL_PREFIX}", f"ENTRYPOINT {json.dumps(list(spec.runtime.entrypoint))}", "CMD []"]
    return {
        "spec": spec,
        "name": spec.name,
        "target": target,
        "timestamp": options.timestamp,
        "gpubake_version": __version__,
        "base_ref": base_ref,
        "base_pull": base_pull,
        "bootstrap": spec.base.bootstrap.model_dump() if spec.base.bootstrap else None,
        "python_version": spec.python.version,
        "lock_file": LOCK_FILE,
        "image_json": IMAGE_JSON,
        "app_dir": APP_DIR,
        "wheel": f"{APP_DIR}/{wheel.name if wheel else WHEEL_NAME}",
        "wheel_sha256": wheel.sha256 if wheel else "",
        "prefix": INSTALL_PREFIX,
        "scripts": [f"{SCRIPTS_DIR}/{n}" for n in script_names()],
        "labels": image_labels,
        "env": dict(sorted(env.items())),
        "build_env_map": build_env,
        "build_env": [f"{k}={v}" for k, v in sorted(build_env.items())],
        "ports": [p.model_dump() for p in spec.runtime.ports],
        "exposes": exposes,
        "entrypoint": list(spec.runtime.entrypoint),
        "changes": changes,
        "model": spec.model.model_dump(),
        "model_at": spec.model.at,
        "quantized": QUANTIZED,  # quantized formats -> display names (start.sh quantizes to any of them)
        "weight_layers": [{"name": layer.name, "component": layer.component, "bytes": layer.bytes} for layer in layers],
        "weight_plan": [{k: v for k, v in layer.to_json().items() if k != "files"} for layer in layers],
        "repository": repository,
        "tag": tag,
        "push": {"server": options.push.server, "repository": options.push.repository, "tag": options.push.tag}
        if options.push
        else None,
        "has_start_script": has_template(START_TEMPLATE),
        "model_key": _model_key(spec),
    }


def _model_key(spec: ImageSpec) -> str:
    from gpubake.images import model_layer

    return model_layer.model_key(spec)


def _weights_doc(spec: ImageSpec, ctx: dict[str, Any]) -> dict[str, Any]:
    """`weights.json`: the layer plan the Containerfile was rendered with, and where the weights come from."""
    m = spec.model
    return {"at": m.at, "model": m.id, "source": m.source, "quantization": m.quantization, "policy": m.policy,
            "layers": ctx["weight_plan"]}


def _marketplace_payload(spec: ImageSpec, target: str, image_ref: str) -> dict[str, Any] | None:
    try:
        from gpubake.images.marketplace.payload import template_payload
    except ImportError:
        return None
    return template_payload(spec, target, image_ref)


def _normalise(root: Path, timestamp: int) -> dict[str, str]:
    """Fixed modes and mtimes for every entry; returns {relative path: sha256} of files."""
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            os.chmod(path, 0o755)
        else:
            executable = path.suffix == ".sh"
            os.chmod(path, 0o755 if executable else 0o644)
            files[rel] = sha256_file(path)
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (timestamp, timestamp), follow_symlinks=False)
    os.utime(root, (timestamp, timestamp))
    return files


def check_destination(dest: Path) -> list[Path]:
    """Refuse a `dest` that is not new or an empty directory, or that lies under a file.

    Returns the missing directories above `dest` (nearest first): the render creates them,
    so only they may be removed again when it fails.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GpubakeError(f"--render-only: {dest} exists and is not an empty directory")
    missing: list[Path] = []
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise GpubakeError(f"--render-only: {dest}: {parent} is not a directory")
            break
        missing.append(parent)
    return missing


def render_context(spec: ImageSpec, target: str, dest: str | Path, options: RenderOptions | None = None) -> RenderedContext:
    """Write the build context for (spec, target) into `dest`, atomically.

    `dest` must not exist or be an empty directory. On any failure nothing is left: no
    partial context, no directory the render created; an existing empty `dest` stays.
    """
    options = options or RenderOptions()
    dest = Path(dest)
    created = check_destination(dest)
    try:
        return _render(spec, target, dest, options)
    except BaseException:
        for parent in created:  # nearest first; a directory someone filled meanwhile stays
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _render(spec: ImageSpec, target: str, dest: Path, options: RenderOptions) -> RenderedContext:
    skipped: list[str] = []
    with atomic_path(dest) as tmp:  # replaces a missing or empty `dest` only on success
        tmp.mkdir(parents=True)
        wheel = place_app_wheel(tmp / APP_DIR)
        if wheel.left_out:
            shown = ", ".join(wheel.left_out[:5]) + (f" and {len(wheel.left_out) - 5} more" if len(wheel.left_out) > 5 else "")
            skipped.append(f"untracked, so not in gpubake's wheel: {shown} (git add them to ship them)")
        ctx = template_context(spec, target, options, wheel)
        image_ref = options.image_ref or (options.push.ref if options.push else f"{ctx['repository']}:{ctx['tag']}")
        if has_template(CONTAINERFILE_TEMPLATE):
            (tmp / "Containerfile").write_text(render_template(CONTAINERFILE_TEMPLATE, ctx), encoding="utf-8")
        else:
            skipped.append("Containerfile (templates/Containerfile.j2 not in this checkout)")
        (tmp / PACKER_FILE).write_text(render_template(PACKER_TEMPLATE, ctx), encoding="utf-8")
        (tmp / PACKER_PLUGINS_FILE).write_text(PACKER_PLUGINS_HCL, encoding="utf-8")
        (tmp / IMAGE_JSON).write_text(image_facts(spec, target).to_json(), encoding="utf-8")
        (tmp / WEIGHTS_PLAN).write_text(json.dumps(_weights_doc(spec, ctx), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        shutil.copyfile(contained_lock(spec), tmp / LOCK_FILE)
        src_scripts = scripts_source()
        if src_scripts is not None:
            (tmp / SCRIPTS_DIR).mkdir()
            for name in script_names():
                shutil.copyfile(src_scripts / name, tmp / SCRIPTS_DIR / name)
        else:
            skipped.append("scripts/ (gpubake/images/scripts not in this checkout)")
        if has_template(START_TEMPLATE):
            (tmp / "start.sh").write_text(render_template(START_TEMPLATE, ctx), encoding="utf-8")
        else:
            skipped.append("start.sh (templates/start.sh.j2 not in this checkout)")
        payload = _marketplace_payload(spec, target, image_ref)
        if payload is not None:
            (tmp / "marketplace").mkdir()
            (tmp / "marketplace" / f"{target}.json").write_text(
                json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        else:
            skipped.append("marketplace/ (gpubake.images.marketplace.payload not in this checkout)")
        files = _normalise(tmp, options.timestamp)
        manifest = {"gpubake_version": __version__, "image": spec.name, "target": target, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp / MANIFEST, 0o644)
        os.utime(tmp / MANIFEST, (options.timestamp, options.timestamp))
        os.utime(tmp, (options.timestamp, options.timestamp))
    return RenderedContext(path=dest, files=files, skipped=skipped)
