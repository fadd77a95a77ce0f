"""The marketplace template for an image spec, as the JSON body each API takes.

One pure function, `template_payload(spec, target, image_ref)`, used by `publish` (the
body it sends) and by `build-image --render-only` (the `template.<target>.json` it writes),
so that what is reviewed is what is sent. It holds no secret: the registry credentials are
referred to by an ID stored at the marketplace (RunPod `registry`) or by the registry host
only (Vast.ai `docker_login_repo`; the login itself is added by `publish` at send time,
from the environment).

Field names follow the API docs:
- RunPod REST v2, createTemplate (`CreateTemplateRequest` of RunPod's OpenAPI document,
  vendored as tests/contracts/openapi/runpod-v2.json; https://docs.runpod.io/api-reference-v2)
- Vast.ai, "create template": https://docs.vast.ai/api-reference/templates/create-template
  and "Creating and Using Templates with API" (env string format, extra_filters):
  https://docs.vast.ai/api-reference/creating-and-using-templates-with-api
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING, Any

from gpubake.errors import GpubakeError
from gpubake.images.spec import VAST_ENV_UNCARRIABLE
from gpubake.provisioning.facts import INSTALL_PREFIX

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
TEMPLATE_PREFIX = "gpubake-"
VAST_GPU_RAM_TOLERANCE = 0.95  # of the GB a card is sold as (see vast_gpu_ram_mb)


def template_name(spec: ImageSpec) -> str:
    """The marketplace-side template name: publish finds and updates templates by it."""
    return TEMPLATE_PREFIX + spec.name


def is_digest_ref(ref: str) -> bool:
    return bool(_DIGEST.search(ref))


def api_port(spec: ImageSpec) -> int:
    """The service's port, by the start script's rule: the port named "api", else the
    first http one, else 8000."""
    for p in spec.runtime.ports:
        if p.name == "api":
            return p.port
    return next((p.port for p in spec.runtime.ports if p.protocol == "http"), 8000)


def compute_caps(spec: ImageSpec) -> list[int]:
    """gpu_archs as Vast.ai's compute_cap numbers (sm_89 -> 890, sm_120 -> 1200)."""
    return sorted(int(a[3:]) * 10 for a in spec.gpu_archs)


def _readme(spec: ImageSpec) -> str:
    ports = ", ".join(f"{p.port}/{p.protocol} ({p.name})" for p in spec.runtime.ports) or "none"
    archs = ", ".join(spec.gpu_archs) or "CPU"
    return (
        f"# {spec.name}\n\n{spec.description}\n\n"
        f"- model: {spec.model.id} ({spec.model.quantization})\n"
        f"- GPUs: {archs}; CUDA {spec.cuda}, torch {spec.torch}\n"
        f"- ports: {ports}\n"
        "- on boot the image runs a self-test; `GET /health` returns its report.\n\n"
        "Built and published by gpubake."
    )


RUNPOD_MIN_VOLUME_GB = 10  # PersistentMount.size: "Upstream enforces a 10 GB floor"
# CUDA versions RunPod hosts report, for a template's allowedCudaVersions (an exact set,
# matched as major.minor: see createPod's gpu.allowedCudaVersions in RunPod's v2 document).
RUNPOD_CUDA_VERSIONS = ("11.8", "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.7", "12.8", "12.9", "13.0")


def runpod_cuda_versions(spec: ImageSpec) -> list[str]:
    """allowedCudaVersions for RunPod: every host CUDA at least the image's."""
    if spec.cuda == "none":
        return []
    floor = tuple(int(p) for p in spec.cuda.split("."))
    return [v for v in RUNPOD_CUDA_VERSIONS if tuple(int(p) for p in v.split(".")) >= floor]
SERVERLESS_SUFFIX = "-serverless"
API_KEY_VAR = "GPUBAKE_API_KEY"  # the service's key (provisioning.serving.auth)
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SECRET_REF = re.compile(r"^\{\{\s*RUNPOD_SECRET_([A-Za-z0-9_-]+)\s*\}\}$")


def runpod_secret_ref(name: str) -> str:
    """The env value RunPod replaces with the account secret `name` when a pod or worker
    starts (`{{ RUNPOD_SECRET_name }}`, docs.runpod.io/pods/templates/secrets): a template
    that is shared and rendered holds the reference, never the key."""
    if not _SECRET_NAME.match(name):
        raise GpubakeError(f"--api-key-secret: {name!r} is not a RunPod secret name (letters, digits, _ and -, at most 64)")
    return "{{ RUNPOD_SECRET_" + name + " }}"


def secret_of(value: Any) -> str | None:
    """The secret name an env value refers to (`{{ RUNPOD_SECRET_name }}`), else None."""
    match = _SECRET_REF.match(str(value).strip()) if isinstance(value, str) else None
    return match.group(1) if match else None


def runpod_payload(spec: ImageSpec, image_ref: str, *, registry_auth: str | None = None,
                   serverless: bool = False, api_key_secret: str | None = None) -> dict[str, Any]:
    """Body of RunPod REST v2 `POST /v2/templates` (and `PATCH /v2/templates/{id}`).

    v2 has no entrypoint, start-command or readme field: the image's own ENTRYPOINT (the
    gpubake start script) runs with `args` empty. `startSsh` lets RunPod put the account's
    SSH keys in `PUBLIC_KEY` (launch's `--ssh-key` goes in `SSH_PUBLIC_KEY`, so both work);
    `startJupyter` is off (it would inject a generated JUPYTER_PASSWORD for a Jupyter the
    image does not run). `allowedCudaVersions` serves pods started from RunPod's console;
    `launch` sends its own numeric floor (`gpu.minCudaVersion`), which replaces it.
    A serverless template (`serverless=True`, name `gpubake-NAME-serverless`) is what a
    serverless endpoint must be created from; its workers expose no ports and run the
    RunPod handler (the start script picks it when RUNPOD_ENDPOINT_ID is set).
    With `api_key_secret`, the service's key comes from that RunPod secret: the env holds
    `GPUBAKE_API_KEY = "{{ RUNPOD_SECRET_<name> }}"`, which RunPod fills in at start.
    """
    ports = []
    for i, p in enumerate(spec.runtime.ports):
        if p.protocol == "udp":
            raise GpubakeError(f"runtime.ports[{i}]: RunPod exposes http and tcp ports only, not {p.port}/udp")
        ports.append(f"{p.port}/{p.protocol}")
    body: dict[str, Any] = {
        "name": template_name(spec) + (SERVERLESS_SUFFIX if serverless else ""),
        "image": image_ref,
        "category": "CPU" if spec.cuda == "none" else "NVIDIA",
        "disk": spec.runtime.container_disk_gb,
        "ports": [] if serverless else ports,
        "env": dict(spec.runtime.env) | ({API_KEY_VAR: runpod_secret_ref(api_key_secret)} if api_key_secret else {}),
        "args": "",
        "public": False,
        "serverless": serverless,
        "startSsh": not serverless,
        "startJupyter": False,
        "allowedCudaVersions": runpod_cuda_versions(spec),
    }
    volume = spec.runtime.volume_disk_gb
    if volume and not serverless:
        if volume < RUNPOD_MIN_VOLUME_GB:
            raise GpubakeError(f"runtime.volume_disk_gb: RunPod's persistent volume is at least {RUNPOD_MIN_VOLUME_GB} GB, got {volume}")
        body["mounts"] = {"persistent": {"size": volume, "path": spec.runtime.volume_mount}}
    if registry_auth:
        body["registry"] = registry_auth
    return body


_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VAST_ENV_VALUE_MAX = 256  # create-instance `x-input-validation.env.max_length` (create_instance.yaml)
VAST_ENV_TOTAL_MAX = 32768  # ... `env.max_total_length`


def vast_env_flags(env: dict[str, str], *, where: str = "env") -> list[str]:
    """`-e KEY=VALUE` words of a Vast.ai env string, each value quoted for Vast.ai's parser.

    Vast.ai splits the string on spaces outside quotes and strips one pair of quotes from a
    value; it has no escapes (vast-cli `vastai/utils.py` smart_split/parse_env), so a value
    holding a quote or a line break cannot be carried and is refused here, one line naming
    it, rather than arriving cut. Values are single-quoted as a shell would read them too.
    """
    words = []
    for key, value in sorted(env.items()):
        if not _ENV_KEY.match(key):
            raise GpubakeError(f"{where}: {key!r} is not an environment variable name")
        if any(c in value for c in VAST_ENV_UNCARRIABLE):
            raise GpubakeError(f"{where}.{key}: Vast.ai's env string cannot carry quotes or line breaks")
        words.append(f"-e {key}={shlex.quote(value)}")
    return words


def vast_env_string(spec: ImageSpec) -> str:
    """Vast.ai's "Docker options" string: `-p` for every port, `-e` for every variable.

    `OPEN_BUTTON_PORT` (the API port, unless the spec sets it) points the instance portal's
    Open button at the service ("Maps the Open button to a specific internal port",
    Vast.ai's networking guide).
    """
    parts = []
    for p in spec.runtime.ports:
        suffix = "/udp" if p.protocol == "udp" else ""
        parts.append(f"-p {p.port}:{p.port}{suffix}")
    env = {"OPEN_BUTTON_PORT": str(api_port(spec)), **spec.runtime.env}
    parts.extend(vast_env_flags(env, where="runtime.env"))
    return " ".join(parts)


# Vast.ai's SSH and Jupyter launch modes do not run the image's entrypoint ("the docker
# entrypoint for your image will not be run") but the template's on-start command: there the
# start script runs detached (it returns; the service goes on in its own session). In the
# entrypoint (`args`) launch mode Vast.ai runs no on-start command and the script is the
# entrypoint; a second start finds the service running and starts none.
VAST_ONSTART = f"{INSTALL_PREFIX}/start.sh --detach"


def vast_payload(spec: ImageSpec, image_ref: str, *, registry_auth: str | None = None) -> dict[str, Any]:
    """Body of Vast.ai's `POST /template/` (and, with `hash_id`, `PUT /template/`).

    `runtype = args` keeps the image's own entrypoint (the gpubake start script, which
    follows Vast.ai's conventions itself); `onstart` starts the same script when a user
    picks the SSH or Jupyter launch mode instead (`VAST_ONSTART`); the whole digest reference goes in `image`
    (the docs allow the tag inside it), so no mutable tag is ever resolved. `private`
    keeps the template (image reference, readme) out of Vast.ai's public template search
    (the vendor's CLI defaults to private too).
    """
    body: dict[str, Any] = {
        "name": template_name(spec),
        "image": image_ref,
        "env": vast_env_string(spec),
        "onstart": VAST_ONSTART,
        "runtype": "args",
        "args_str": "",
        "use_ssh": False,
        "ssh_direct": False,
        "jup_direct": False,
        "recommended_disk_space": spec.runtime.container_disk_gb + spec.runtime.volume_disk_gb,
        "desc": spec.description[:200],
        "readme": _readme(spec),
        "extra_filters": _vast_filters(spec),
        "private": True,
    }
    if registry_auth:
        body["docker_login_repo"] = registry_auth
    return body


def _vast_filters(spec: ImageSpec) -> dict[str, Any]:
    if spec.cuda == "none":
        return {}
    filters: dict[str, Any] = {"cuda_max_good": {"gte": float(spec.cuda)}}
    if spec.gpu_archs:
        filters["compute_cap"] = {"in": compute_caps(spec)}
    if spec.min_gpu_memory_gb is not None:  # the template's offer list shows only GPUs with enough memory
        filters["gpu_ram"] = {"gte": vast_gpu_ram_mb(spec)}
    return filters


def vast_gpu_ram_mb(spec: ImageSpec) -> int | None:
    """The image's `min_gpu_memory_gb` as Vast.ai's `gpu_ram` floor: MB in the REST API (the
    document's "Key Quirks"), 95% of GB x 1000 so that marketing rounding (an 80 GB card
    reports ~81559 MB, a 24 GB one 24564) never drops a card of the size asked for."""
    floor = spec.min_gpu_memory_gb
    return None if floor is None else int(VAST_GPU_RAM_TOLERANCE * floor * 1000)


def template_payload(spec: ImageSpec, target: str, image_ref: str, *, registry_auth: str | None = None,
                     api_key_secret: str | None = None) -> dict[str, Any]:
    """The template JSON for `target` ("runpod" | "vastai"); raises `GpubakeError` on bad input."""
    if target not in spec.targets:
        raise GpubakeError(f"--target: image {spec.name!r} is not built for {target} (targets: {', '.join(spec.targets)})")
    if not image_ref or any(c.isspace() for c in image_ref):
        raise GpubakeError(f"--image-ref: not an image reference: {image_ref!r}")
    if target == "runpod":
        return runpod_payload(spec, image_ref, registry_auth=registry_auth, api_key_secret=api_key_secret)
    if target == "vastai":
        if api_key_secret:
            raise GpubakeError("--api-key-secret: RunPod only: Vast.ai has no secret store; `launch` sends "
                               "GPUBAKE_API_KEY in the instance's env instead")
        return vast_payload(spec, image_ref, registry_auth=registry_auth)
    raise GpubakeError(f"--target: must be runpod or vastai, got {target!r}")
