"""docker buildx, for machines with a Docker daemon (not exercised on this project's CI).

Same rendered context and Containerfile as buildah. Reproducibility inputs:
`SOURCE_DATE_EPOCH` as a build arg (BuildKit >= 0.11 uses it for config and history
times; `rewrite-timestamp=true`, BuildKit >= 0.13, clamps file mtimes in layers) and no
provenance attestation (it records build times). BuildKit cannot bind-mount a host
directory into RUN, so step 20 installs the lock from pip's configured index (PyPI and,
for CUDA specs, the lock's --index-url), still checking every hash. The OCI archive
(`--output type=oci`, which needs the docker-container driver or the containerd image
store: `docker buildx create --use`) goes through a temporary name, renamed when complete.
Base images must be pinned registry images: a bootstrap base needs buildah.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from gpubake.errors import BuildError
from gpubake.fsutil import partial_path, place_partial
from gpubake.images.builders import proc
from gpubake.images.builders.base import BuildRequest, BuildResult, ProgressFn, Step
from gpubake.images.builders.buildah import layer_list, read_archive_manifest


class DockerBuilder:
    """`docker buildx build` of a rendered context into an OCI archive."""

    name = "docker"
    install_hint = "install docker with buildx and start its daemon"

    def __init__(self, *, runner: proc.Runner | None = None) -> None:
        self.runner = runner  # the process runner (None: proc.run_step)

    def available(self) -> bool:
        """docker is installed, buildx is present and the daemon answers."""
        if shutil.which("docker") is None:
            return False
        for probe in (["docker", "buildx", "version"], ["docker", "info", "--format", "{{.ServerVersion}}"]):
            try:
                if subprocess.run(probe, capture_output=True, timeout=15).returncode != 0:
                    return False
            except (OSError, subprocess.TimeoutExpired):
                return False
        return True

    def command(self, req: BuildRequest, archive_tmp: Path) -> list[str]:
        """The `docker buildx build` argv for `req` (no secrets: none are needed to build)."""
        cmd = [
            "docker", "buildx", "build",
            "--file", str(Path(req.context_dir) / "Containerfile"),
            "--tag", req.tag,
            "--build-arg", f"SOURCE_DATE_EPOCH={req.timestamp}",
            "--provenance=false",  # attestations embed build times and host data
            "--progress=plain",
        ]  # fmt: skip
        # BuildKit compresses with gzip, zstd or estargz; zstd:chunked is a containers/image
        # format, so it is written as plain zstd here (what a non-containers-storage runtime reads anyway).
        compression = "zstd" if req.compression.startswith("zstd") else "gzip"
        cmd += ["--output", f"type=oci,dest={archive_tmp},name={req.tag},rewrite-timestamp=true,"
                f"compression={compression},force-compression=true"]
        cmd.append(str(req.context_dir))
        return cmd

    def plan(self, req: BuildRequest) -> list[Step]:
        """One `docker buildx build` into the archive's partial name, renamed when complete."""
        return self._plan(req)[0]

    def _plan(self, req: BuildRequest) -> tuple[list[Step], dict]:
        if req.spec.base.bootstrap is not None:
            raise BuildError(f"docker builder: spec {req.spec.name} has a bootstrap base; build it with --builder buildah")
        if req.archive is None:
            raise BuildError("docker builder: needs an archive destination (dist/...oci.tar) to report layer digests")
        archive = req.archive
        tmp = partial_path(archive)
        out: dict = {}

        def before() -> None:
            archive.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)

        def place(_output: str) -> None:
            out["digest"], manifest = read_archive_manifest(tmp)
            out["layers"] = layer_list(manifest)
            place_partial(archive)

        step = Step(
            what=f"docker buildx build of {req.spec.name}",
            argv=tuple(self.command(req, tmp)),
            before=before,
            then=place,
            undo=lambda: tmp.unlink(missing_ok=True),
        )
        return [step], out

    def build(self, req: BuildRequest, on_progress: ProgressFn | None = None) -> BuildResult:
        started = time.monotonic()
        steps, out = self._plan(req)
        proc.execute(steps, log_file=req.log_file, runner=self.runner, on_progress=on_progress)
        layers = out["layers"]
        return BuildResult(
            digest=out["digest"],
            archive=req.archive,
            layers=layers,
            total_size=sum(layer["size"] for layer in layers),
            builder=self.name,
            seconds=time.monotonic() - started,
        )
