"""Every `GPUBAKE_*` environment variable, declared once: name, meaning, default, parser, side.

Why one table: a variable is often set in one place (the start script, a spec's
`runtime.env`, the renderer) and read in another (the self-test, the service, a builder).
Declared here, a rename or a new default is one edit, `docs/environment.md` is generated
from this table (`python -m gpubake.envs > docs/environment.md`), and tests fail when a
module reads a `GPUBAKE_` variable from `os.environ` itself or names one that is not here.

Read values through this module, vLLM-style: `envs.GPUBAKE_CACHE` (the parsed value, or the
default), or `envs.value(name, env)` for a mapping other than `os.environ`. Values are read
at call time, so a changed (or monkeypatched) environment is seen. Unset and empty are the
same. A bad value is one `GpubakeError` line naming the variable. `side` says where it
matters: `build` (the machine that builds, publishes and launches) or `image` (inside an
image, at build or at boot). Secrets are marked and never printed with their value.
This module imports nothing from gpubake but `errors`, so both sides can use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError

Parser = Callable[[str, str], Any]  # (variable name, raw value) -> value


def _text(_name: str, raw: str) -> str:
    return raw


def _path(_name: str, raw: str) -> Path:
    return Path(raw)


def _one_of(*choices: str) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if value not in choices:
            raise GpubakeError(f"{name}: {value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise GpubakeError(f"{name}: not a number: {raw!r}") from None
    if value < 0:
        raise GpubakeError(f"{name}: must be >= 0, got {raw!r}")
    return value


def _count(name: str, raw: str) -> int:
    text = raw.strip()
    if not text.isdigit() or int(text) < 1:
        raise GpubakeError(f"{name}: a whole number >= 1, got {raw!r}")
    return int(text)


@dataclass(frozen=True)
class Var:
    """One variable: what it means, its default, how its value is read, where it matters."""

    name: str
    meaning: str
    side: str  # "build" | "image"
    default: str | None = None  # the value when unset (None: none, or computed: see default_doc)
    default_doc: str = ""  # the default in words, where it is computed by the code that reads it
    kind: str = "text"  # for the docs: text, path, number, port ...
    parse: Parser = _text
    secret: bool = False
    set_by: str = ""  # the part of gpubake that sets it, where one does
    choices: tuple[str, ...] = ()  # the values it may take (checked when read here; the docs list them)

    def __post_init__(self) -> None:
        if not self.name.startswith("GPUBAKE_") or self.side not in ("build", "image"):
            raise ValueError(f"bad declaration of {self.name}")
        if self.choices:
            object.__setattr__(self, "kind", " | ".join(self.choices))
            if self.parse is _text:
                object.__setattr__(self, "parse", _one_of(*self.choices))


_DECLARED = object()

_VARS = (
    # ------------------------------------------------------------------ build side
    Var("GPUBAKE_CACHE", "Cache root: bootstrap bases, wheels, models, the image store.", "build",
        default_doc="$XDG_CACHE_HOME/gpubake, else ~/.cache/gpubake", kind="path", parse=_path),
    Var("GPUBAKE_STORAGE_ROOT", "buildah/skopeo containers-storage of gpubake (tests give each session its own).", "build",
        default_doc="$GPUBAKE_CACHE/containers", kind="path", parse=_path),
    Var("GPUBAKE_STORAGE_DRIVER", "Storage driver of that store: overlay stores diffs; vfs works in any sandbox but "
        "copies the whole tree per layer; auto takes overlay where the kernel mounts it for us (root), else vfs.", "build",
        default="auto", choices=("auto", "overlay", "vfs")),
    Var("GPUBAKE_DEBIAN_MIRROR", "Debian mirror of debootstrap for `[base.bootstrap]` bases (part of the base's cache key); "
        "when set, it replaces the spec's dated base.apt_mirror (a machine that cannot reach snapshot.debian.org).",
        "build", default_doc="the spec's base.apt_mirror, else http://deb.debian.org/debian"),
    Var("GPUBAKE_REGISTRY_USER", "Registry user for `build-image --push`, and Vast.ai's template login.", "build"),
    Var("GPUBAKE_REGISTRY_PASSWORD", "Registry password or token for the same (reaches skopeo through a private auth file).",
        "build", secret=True),
    Var("GPUBAKE_CONFIG", "The marketplace config file (API keys, registry auth IDs).", "build",
        default_doc="$XDG_CONFIG_HOME/gpubake/config.toml, else ~/.config/gpubake/config.toml", kind="path", parse=_path),
    Var("GPUBAKE_RUNPOD_API_URL", "Base URL of RunPod's REST API (tests point it at a local server).", "build",
        default="https://api.runpod.io/v2"),  # REST v1 was retired on 2026-11-15
    Var("GPUBAKE_VAST_API_URL", "Base URL of Vast.ai's API (tests point it at a local server).", "build",
        default="https://console.vast.ai/api/v0"),
    Var("GPUBAKE_HTTP_TIMEOUT", "Read timeout of each marketplace API request, in seconds.", "build",
        default_doc="the client's default", kind="seconds"),
    Var("GPUBAKE_RUNPOD_PROXY_URL", "URL pattern of a RunPod pod's HTTP port ({pod_id}, {port}).", "build",
        default="https://{pod_id}-{port}.proxy.runpod.net"),
    Var("GPUBAKE_HTTP_BACKOFF", "Backoff factor of the marketplace clients' retries, in seconds.", "build",
        default="1.0", kind="number >= 0", parse=_seconds),
    Var("GPUBAKE_TORCH", "torch release scripts/setup.sh installs.", "build", default="2.13.0"),
    # ------------------------------------------------------------------ image side: build steps
    Var("GPUBAKE_PYTHON", "In-image build steps: the image's Python version (python$GPUBAKE_PYTHON).", "image",
        default_doc="the spec's python.version", set_by="render (build steps)"),
    Var("GPUBAKE_PREFIX", "In-image build steps: where gpubake is installed.", "image", default="/opt/gpubake",
        kind="path", set_by="render (build steps)"),
    Var("GPUBAKE_APT_MIRROR", "In-image build step 10: the only apt mirror it reads (a dated snapshot), on an image base.",
        "image", default_doc="the base's own apt sources", set_by="render (build steps): the spec's base.apt_mirror"),
    # ------------------------------------------------------------------ image side: boot
    Var("GPUBAKE_IMAGE", "Catalog name of the image: the self-test's and the service's spec.", "image",
        set_by="render (build steps), start.sh (the image's own name unless set)"),
    Var("GPUBAKE_TARGET", "Marketplace the image was built for: runpod or vastai.", "image", kind="runpod | vastai",
        set_by="start.sh (the build steps name no target: both targets share their layers)"),
    Var("GPUBAKE_IMAGE_FACTS", "Path of the image's image.json (spec summary, min_driver, runnable_archs).", "image",
        kind="path", parse=_path),
    Var("GPUBAKE_MODEL_DIR", "The baked checkpoint the self-test and the service load.", "image",
        default_doc="the spec's runtime.env (/opt/gpubake/model)", kind="path", parse=_path, set_by="spec runtime.env"),
    Var("GPUBAKE_RUNTIME", "Runtime plan: auto (measured per architecture), plain (no lever), or LEVER=VALUE,...", "image",
        default="auto"),
    Var("GPUBAKE_NVFP4_BACKEND", "NVFP4 GEMM backend instead of the one chosen by compute capability: blackwell-native, "
        "hopper-fp8, dequant-bf16, cpu-reference.", "image", default_doc="by compute capability"),
    Var("GPUBAKE_FP8_BACKEND", "FP8-weight checkpoint (format fp8) GEMM path instead of the one chosen by compute "
        "capability: scaled-mm (W8A8, FP8 tensor cores), dequant-bf16, reference.", "image",
        default_doc="by compute capability"),
    Var("GPUBAKE_SELFTEST", "Boot self-test: full, quick (sample the weight hashes) or off.", "image",
        default_doc="full (start.sh); quick (RunPod serverless handler)", kind="full | quick | off"),
    Var("GPUBAKE_GPUS_PER_CLIP", "`gpubake serve --gpus-per-clip`: GPUs that render ONE clip together (context parallelism, "
        "one process per GPU); 1 renders one clip per GPU. N must divide the GPUs torch sees.", "image", default="1",
        kind="number >= 1", parse=_count),
    Var("GPUBAKE_LOAD_THREADS", "Loader: threads that read each expert's tensors onto the device at once (1: one "
        "tensor at a time, as safetensors' load_file). 8: on an H200 a later boot's load took 33.8 s against 37.1 s "
        "with one thread, the boot 68.3 s against 72.4 (one A/B pair, 2026-12-01, docs/benchmarks.md); the same "
        "tensors either way.", "image", default="8", kind="number >= 1", parse=_count),
    Var("GPUBAKE_LOAD_DIRECT", "Loader: diffusers' from_pretrained puts the text encoder and the VAE straight on the "
        "GPU (device_map) instead of loading them on the host and moving them. On `cuda` / `cuda:0` only (diffusers "
        "takes no other index) and not with text_encoder=shrink or expert_offload. On: on an H200 a later boot of "
        "the A14B took 55.1 s against 59.8 s with it off (one A/B pair, 2026-12-01, docs/benchmarks.md).", "image",
        default="on", choices=("on", "off")),
    Var("GPUBAKE_LOAD_OVERLAP", "Loader: the experts' tensors are read in a thread while diffusers loads the text "
        "encoder, VAE, tokenizer and scheduler and moves them to the GPU (one after the other when off). On: on an "
        "H200 a later boot of the A14B took 57.9 s against 59.8 s alone, and with the two other boot levers the "
        "load 17.3 s against 26.8 s with direct placement alone (2026-12-01, docs/benchmarks.md); the same tensors "
        "either way.", "image", default="on", choices=("on", "off")),
    Var("GPUBAKE_PREIMPORT", "Self-test: import the render stage's libraries (diffusers' Wan pipeline, transformers' "
        "UMT5, torch's compiler) in a background thread while the model files hash (hashlib releases the GIL); the "
        "render stage waits for it before its own imports. On: with the two loader levers, a later boot of the "
        "A14B on an H200 took 53.4 s against 55.1 s without it and the overlap (2026-12-01, docs/benchmarks.md).",
        "image", default="on", choices=("on", "off")),
    Var("GPUBAKE_X264_PRESET", "Self-test and service: the x264 preset each clip's MP4 is written with (the same "
        "CRF). veryfast: on 81 video-like frames 2.1x / 2.3x faster than x264's default medium at 480p / 720p, the "
        "file the same size, 0.2-0.3 dB lower PSNR (bench/bench_video_write.py, 2026-12-01, docs/benchmarks.md).",
        "image", default="veryfast",
        choices=("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")),
    Var("GPUBAKE_PREFETCH", "Self-test and service: read the checkpoint's files into the page cache in the background "
        "from the start (as much as fits in memory). Off: on an H200 host's local disk it did not shorten the boot "
        "(the loader, not the disk, is the bound); try it for a slow network volume.", "image", default="off",
        choices=("on", "off")),
    Var("GPUBAKE_COMPILE_CACHE", "Where torch.compile's inductor and Triton caches persist (TORCHINDUCTOR_CACHE_DIR and "
        "TRITON_CACHE_DIR, unless those are set): on the volume, only a volume's first boot compiles.", "image",
        default_doc="$GPUBAKE_HOME/compile-cache where GPUBAKE_HOME is set (start.sh), else torch's own (/tmp)",
        kind="path", parse=_path),
    Var("GPUBAKE_REPORT", "Path of the self-test report (JSON).", "image",
        default_doc="$GPUBAKE_HOME/selftest.json (start.sh); else /workspace/gpubake/selftest.json where /workspace "
        "exists, else ~/.cache/gpubake/selftest.json", kind="path", parse=_path, set_by="start.sh"),
    Var("GPUBAKE_OUTPUT_DIR", "Where the service writes job videos.", "image", default_doc="beside the report",
        kind="path", parse=_path, set_by="start.sh"),
    Var("GPUBAKE_BOOT_EPOCH", "Boot time (seconds since the epoch), for the self-test's boot-to-verdict time.", "image",
        kind="seconds", set_by="start.sh"),
    Var("GPUBAKE_API_KEY", "API key the generation service requires of its clients.", "image", secret=True),
    Var("GPUBAKE_OUTPUT_S3", "RunPod serverless: s3://bucket/prefix for clips too large to return inline (a presigned URL is returned).",
        "image"),
    Var("GPUBAKE_INLINE_MAX_BYTES", "RunPod serverless: the largest base64 clip returned inline; larger ones go to $GPUBAKE_OUTPUT_S3.",
        "image", default_doc="9000000"),
    Var("GPUBAKE_DATA_DIR", "The generation service's data directory (jobs, outputs).", "image", kind="path", parse=_path),
    Var("GPUBAKE_WORKSPACE", "start.sh: the persistent volume; reports and videos go to $GPUBAKE_WORKSPACE/gpubake.", "image",
        default_doc="the spec's runtime.volume_mount (/workspace)", kind="path"),
    Var("GPUBAKE_HOME", "start.sh: gpubake's folder on the volume, else /tmp/gpubake when it is not writable.", "image",
        kind="path", set_by="start.sh"),
    Var("GPUBAKE_PORT", "start.sh: port of the HTTP service.", "image", default_doc="the spec's api port (8000)",
        kind="port"),
    Var("GPUBAKE_MODE", "start.sh: serve, or serverless (the RunPod handler).", "image",
        default_doc="serverless when RUNPOD_ENDPOINT_ID is set, else serve", kind="serve | serverless"),
    Var("GPUBAKE_DETACH", "start.sh: 1 = start the service in the background and return (Vast.ai's on-start).", "image",
        default="0", kind="0 | 1"),
    Var("GPUBAKE_BIN", "start.sh: the gpubake command.", "image", default="gpubake"),
    Var("GPUBAKE_PYTHON_BIN", "start.sh: the Python command of the RunPod serverless handler, the boot-time weight "
        "fetch (model.at = boot) and the PROVISIONING_SCRIPT check.", "image", default="python3"),
    Var("GPUBAKE_ETC", "start.sh: where rp_environment / environment (for SSH sessions) are written.", "image",
        default="/etc", kind="path"),
    Var("GPUBAKE_SSHD_PIDFILE", "start.sh: pid file of a running sshd.", "image", default="/run/sshd.pid", kind="path"),
    Var("GPUBAKE_HOOK_DIR", "start.sh: where RunPod's pre_start.sh / post_start.sh hooks are looked for.", "image",
        default="/", kind="path"),
    Var("GPUBAKE_SSH_WAIT", "start.sh, Vast.ai: seconds to wait for a key attached through Vast.ai's API to reach "
        "authorized_keys before giving up on sshd.", "image", default="600", kind="seconds"),
    Var("GPUBAKE_PROVISIONING_SHA256", "start.sh: sha256 that PROVISIONING_SCRIPT (ai-dock's) must have to be run.",
        "image", kind="64 hex"),
)

VARIABLES: dict[str, Var] = {v.name: v for v in _VARS}


def declared(name: str) -> Var:
    """The declaration of `name`; a name not declared here is a bug, not bad input."""
    try:
        return VARIABLES[name]
    except KeyError:
        raise KeyError(f"{name} is not declared in gpubake.envs") from None


def raw(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """`name` as set in `env` (default: `os.environ`, now); None when unset or empty."""
    declared(name)
    text = (os.environ if env is None else env).get(name)
    return text if text else None


def value(name: str, env: Mapping[str, str] | None = None, *, default: Any = _DECLARED) -> Any:
    """The parsed value of `name`, else `default` (by default the declared one, parsed)."""
    var = declared(name)
    text = raw(name, env)
    if text is None:
        fallback = var.default if default is _DECLARED else default
        if not isinstance(fallback, str):
            return fallback  # None, or a value the caller computed
        text = fallback
    return var.parse(name, text)


def secret_names() -> tuple[str, ...]:
    """The declared variables whose values are secrets."""
    return tuple(v.name for v in _VARS if v.secret)


def __getattr__(name: str) -> Any:  # envs.GPUBAKE_CACHE: the value now
    if name in VARIABLES:
        return value(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *VARIABLES])


def markdown() -> str:
    """docs/environment.md: every variable, by side (a test keeps the file equal to this)."""
    out = [
        "# Environment variables",
        "",
        "Generated from `src/gpubake/envs.py` (`python -m gpubake.envs > docs/environment.md`); edit",
        "the declarations there, not this file. Unset and empty are the same. Values marked",
        "secret are never printed, logged or rendered.",
        "",
    ]
    titles = {"build": "Build side (the machine that builds, publishes, launches)", "image": "Image side (inside an image: build steps, boot)"}
    for side, title in titles.items():
        out += [f"## {title}", "", "| variable | meaning | default | kind | set by |", "|---|---|---|---|---|"]
        for v in _VARS:
            if v.side != side:
                continue
            default = f"`{v.default}`" if v.default is not None else v.default_doc or "-"
            cells = (f"`{v.name}`", v.meaning, default, v.kind + (", secret" if v.secret else ""), v.set_by or "-")
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m gpubake.envs`: the Markdown table; `--values`: what is set now (secrets masked)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--values"]:
        for v in _VARS:
            text = raw(v.name)
            if text is not None:
                print(f"{v.name}={'***' if v.secret else text}")
        return 0
    if args:
        print("usage: python -m gpubake.envs [--values]", file=sys.stderr)
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
