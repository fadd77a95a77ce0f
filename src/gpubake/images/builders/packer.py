"""The `packer` builder: a thin wrapper of our own over the packer CLI.

Hand-written because no maintained Python wrapper of Packer exists (python-packer and
its forks stopped before HCL2). It does three things and nothing else:

1. `packer validate` the rendered `image.pkr.hcl` (templates/image.pkr.hcl.j2);
2. `packer build -machine-readable`, turning the event stream into rich progress lines,
   the artifact id and one-line errors;
3. export the committed image from the docker daemon to the OCI archive the other
   builders write (skopeo), and read its digest and layers.

Those commands (and, for a bootstrap base, loading it into docker) are `plan(req)`;
`build(req)` runs that plan through `proc.execute`.

Packer's machine-readable format (https://developer.hashicorp.com/packer/docs/commands#machine-readable-output):
one event per line, `timestamp,target,type,data...`; inside data, commas are written
`%!(PACKER_COMMA)` and newlines as the two characters `\\n`.

Versions: Packer 1.6.x builds `image.pkr.hcl` alone (docker builder built in; it rejects
`required_plugins`). From 1.7 the directory is built after `packer init`, so
`plugins.pkr.hcl` (required from 1.10, which bundles no plugins) is read too.
The docker builder needs a docker daemon; the image it commits carries the build time,
so unlike the buildah builder, two packer builds do not give the same digest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpubake.errors import BuildError
from gpubake.fsutil import partial_path, place_partial
from gpubake.images.builders.base import BuildRequest, BuildResult, ProgressFn, Step
from gpubake.images.builders.proc import Runner, execute, last_meaningful_line
from gpubake.secrets import redact

PACKER_FILE = "image.pkr.hcl"
COMMA = "%!(PACKER_COMMA)"


# ----------------------------------------------------------------- machine-readable events


def unescape(field_text: str) -> str:
    """Undo Packer's machine-readable escaping of one data field."""
    return field_text.replace("\\n", "\n").replace("\\r", "\r").replace(COMMA, ",")


@dataclass(frozen=True)
class Event:
    """One machine-readable line: `timestamp,target,type,data...`."""

    timestamp: int
    target: str
    type: str
    data: tuple[str, ...]

    @property
    def text(self) -> str:
        """The human text of a `ui` event (data[1]), else the data joined."""
        if self.type == "ui" and len(self.data) >= 2:
            return self.data[1]
        return ",".join(self.data)


def parse_line(line: str) -> Event | None:
    """Parse one line; None for lines that are not machine-readable events."""
    parts = line.rstrip("\r\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit() or not parts[2]:
        return None
    return Event(timestamp=int(parts[0]), target=parts[1], type=parts[2], data=tuple(unescape(p) for p in parts[3:]))


@dataclass
class BuildEvents:
    """What a build's event stream said: artifacts, errors, progress lines."""

    artifacts: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # `error` events (one per failed build)
    ui_errors: list[str] = field(default_factory=list)  # `ui,error` lines
    error_count: int = 0
    version: str | None = None

    def feed(self, event: Event) -> str | None:
        """Record one event; return a one-line progress message for it, if any."""
        if event.type == "version" and event.data:
            self.version = event.data[0]
        elif event.type == "artifact" and len(event.data) >= 2:
            index = int(event.data[0]) if event.data[0].isdigit() else 0
            key = event.data[1]
            if key != "end":
                self.artifacts.setdefault((event.target, index), {})[key] = event.data[2] if len(event.data) > 2 else ""
        elif event.type == "error-count" and event.data:
            self.error_count = int(event.data[0]) if event.data[0].isdigit() else self.error_count
        elif event.type == "error" and event.data:
            self.errors.append(event.data[0].strip())
        elif event.type == "ui" and len(event.data) >= 2:
            kind, text = event.data[0], event.data[1].strip()
            if kind == "error":
                self.ui_errors.append(text)
            if kind in ("say", "error") and text:
                return text.splitlines()[0]
        return None

    @property
    def artifact_id(self) -> str | None:
        """The id of the last artifact reported (after post-processors: the tagged image)."""
        if not self.artifacts:
            return None
        last = sorted(self.artifacts)[-1]
        return self.artifacts[last].get("id")

    def first_error(self) -> str | None:
        """The most specific error: an `error` event, else the first meaningful `ui,error`."""
        for text in self.errors + self.ui_errors:
            line = " ".join(text.split())
            line = re.sub(r"^(==>|-->)\s*", "", line)
            if line and not line.startswith("Some builds didn't complete"):
                return line[:400]
        return None


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    for line in lines:
        event = parse_line(line)
        if event is not None:
            yield event


def summarize(output: str) -> BuildEvents:
    """Parse a whole captured machine-readable output."""
    events = BuildEvents()
    for event in parse_events(output.splitlines()):
        events.feed(event)
    return events


# ----------------------------------------------------------------------------- packer CLI


def packer_version(packer: str = "packer") -> tuple[int, int, int]:
    """Installed Packer version, e.g. (1, 6, 6)."""
    try:
        proc = subprocess.run([packer, "version", "-machine-readable"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BuildError("packer builder: packer is not installed (apt-get install packer, or run scripts/setup.sh)") from None
    events = summarize(proc.stdout)
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", events.version or "")
    if not match:
        raise BuildError(f"packer builder: cannot read the packer version from {proc.stdout.strip()[:200]!r}")
    return int(match[1]), int(match[2]), int(match[3])


def build_target(context_dir: Path, version: tuple[int, int, int]) -> str:
    """What to pass to packer: the template file on 1.6.x, the directory from 1.7 on."""
    return PACKER_FILE if version < (1, 7, 0) else "."


def validate_steps(context_dir: Path, version: tuple[int, int, int], *, log_file: Path, packer: str = "packer") -> list[Step]:
    """`packer init` (from 1.7) and `packer validate` of the context; a failure is one line."""
    target = build_target(context_dir, version)
    steps = []
    if target == ".":
        steps.append(Step(what="packer init", argv=(packer, "init", "."), cwd=context_dir))

    def explain(exc: BuildError) -> BuildError:
        output = getattr(exc, "output", "")
        detail = summarize(output).first_error() or last_meaningful_line(output)
        return BuildError(f"packer validate: {redact(detail)} (full log: {log_file})")

    steps.append(Step(what="packer validate", argv=(packer, "validate", "-machine-readable", target), cwd=context_dir, explain=explain))
    return steps


def validate(context_dir: Path, *, log_file: Path, packer: str = "packer") -> None:
    """`packer validate` the context's template; a failure is one `BuildError` line."""
    execute(validate_steps(context_dir, packer_version(packer), log_file=log_file, packer=packer), log_file=log_file)


def _docker_daemon_up() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def archive_summary(archive: Path) -> tuple[str, list[dict], int]:
    """(manifest digest, [{digest, size}], total layer bytes) of a single-image OCI archive."""
    from gpubake.images.builders.buildah import layer_list, read_archive_manifest

    digest, manifest = read_archive_manifest(archive)
    layers = layer_list(manifest)
    return digest, layers, sum(layer["size"] for layer in layers)


class PackerBuilder:
    """Builds the rendered context with `packer build` (docker builder) and exports it."""

    name = "packer"
    install_hint = "install packer and docker"

    def __init__(self, packer: str = "packer", *, runner: Runner | None = None) -> None:
        self.packer = packer
        self.runner = runner  # the process runner (None: proc.run_step)

    def available(self) -> bool:
        """packer is installed and a docker daemon answers (the docker builder needs one)."""
        return shutil.which(self.packer) is not None and _docker_daemon_up()

    def plan(self, req: BuildRequest) -> list[Step]:
        """Validate, load a bootstrap base into docker, `packer build`, export to the archive.

        Asks `packer version` (file or directory, `packer init` or not): packer must be installed.
        """
        return self._plan(req)[0]

    def _plan(self, req: BuildRequest) -> tuple[list[Step], dict]:
        context = Path(req.context_dir)
        version = packer_version(self.packer)
        steps = validate_steps(context, version, log_file=req.log_file, packer=self.packer)
        if req.spec.base.bootstrap is not None:
            from gpubake.images import bootstrap

            inputs = bootstrap.inputs_for(req.spec, req.timestamp)
            steps += bootstrap.import_steps(inputs, f"docker-daemon:{inputs.ref()}", "load bootstrap base into docker")
        repository, _, tag = req.tag.rpartition(":")
        out: dict = {}
        progress = BuildEvents()

        def watch(line: str) -> str | None:
            event = parse_line(line)
            return progress.feed(event) if event is not None else None

        def explain(exc: BuildError) -> BuildError:
            detail = summarize(getattr(exc, "output", "")).first_error() or "see the log"
            return BuildError(f"packer build: {detail} (full log: {req.log_file})")

        def artifact(output: str) -> None:
            out["artifact"] = summarize(output).artifact_id
            if out["artifact"] is None:
                raise BuildError(f"packer build: finished without an artifact (full log: {req.log_file})")

        argv = (self.packer, "build", "-machine-readable", "-color=false", "-var", f"repository={repository}", "-var", f"tag={tag}",
                build_target(context, version))  # fmt: skip
        steps.append(Step(what="packer build", argv=argv, cwd=context, watch=watch, explain=explain, then=artifact))
        if req.archive is not None:
            steps.append(self._export_step(req, tag, out))
        return steps, out

    @staticmethod
    def _export_step(req: BuildRequest, tag: str, out: dict) -> Step:
        """skopeo copy from the docker daemon to the archive's partial name, renamed when complete."""
        archive = req.archive
        assert archive is not None
        tmp = partial_path(archive)

        def before() -> None:
            archive.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)

        def place(_output: str) -> None:
            out["digest"], out["layers"], out["total"] = archive_summary(tmp)
            place_partial(archive)

        return Step(
            what="export image",
            argv=("skopeo", "copy", "--quiet", "--dest-compress-format", req.compression,
                  f"docker-daemon:{req.tag}", f"oci-archive:{tmp}:{tag}"),
            before=before,
            then=place,
            undo=lambda: tmp.unlink(missing_ok=True),
        )

    def build(self, req: BuildRequest, on_progress: ProgressFn | None = None) -> BuildResult:
        start = time.monotonic()
        if shutil.which(self.packer) is None:
            raise BuildError("packer builder: packer is not installed (apt-get install packer, or run scripts/setup.sh)")
        if not _docker_daemon_up():
            raise BuildError("packer builder: no docker daemon answers `docker info` (Packer's docker builder needs one)")
        steps, out = self._plan(req)
        execute(steps, log_file=req.log_file, runner=self.runner, on_progress=on_progress)
        if req.archive is None:
            out.update(digest=out["artifact"], layers=[], total=0)
        return BuildResult(
            digest=out["digest"],
            archive=req.archive,
            layers=out["layers"],
            total_size=out["total"],
            builder=self.name,
            seconds=time.monotonic() - start,
        )
