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
from gpubake.fsutil import atomic_path
from gpubake.images.builders.base import BuildRequest, BuildResult
from gpubake.images.builders.buildah import layer_list, read_archive_manifest
from gpubake.images.builders.proc import run_logged


class DockerBuilder:
    """`docker buildx build` of a rendered context into an OCI archive."""

    name = "docker"

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
        cmd += ["--output", f"type=oci,dest={archive_tmp},name={req.tag},rewrite-timestamp=true"]
        cmd.append(str(req.context_dir))
        return cmd

    def build(self, req: BuildRequest) -> BuildResult:
        started = time.monotonic()
        if req.spec.base.bootstrap is not None:
            raise BuildError(f"docker builder: spec {req.spec.name} has a bootstrap base; build it with --builder buildah")
        if req.archive is None:
            raise BuildError("docker builder: needs an archive destination (dist/...oci.tar) to report layer digests")
        with atomic_path(req.archive) as tmp:
            run_logged(self.command(req, tmp), log_file=req.log_file, what=f"docker buildx build of {req.spec.name}")
            digest, manifest = read_archive_manifest(tmp)
        layers = layer_list(manifest)
        return BuildResult(
            digest=digest,
            archive=req.archive,
            layers=layers,
            total_size=sum(layer["size"] for layer in layers),
            builder=self.name,
            seconds=time.monotonic() - started,
        )
