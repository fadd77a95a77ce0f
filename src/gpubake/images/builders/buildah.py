"""The default builder: buildah, daemonless, chroot isolation, vfs storage.

Why buildah: it needs no daemon and no privileges beyond root in a plain VM or CI
container, and `buildah bud --timestamp` makes image configs and layer mtimes fixed,
which is what reproducible digests need. The flow:

1. a `[base.bootstrap]` base is built or reused (`gpubake.images.bootstrap`);
2. the lock's wheels are downloaded on the host with the host's pip configuration
   (`pip download --require-hashes`, cached per lock) and mounted read-only into the
   build at /tmp/gpubake-wheels: the build needs no network and names no host path;
3. `buildah bud --layers --timestamp SOURCE_DATE_EPOCH` builds the rendered context;
4. `buildah push` writes `dist/<name>-<target>.oci.tar` through a temporary name that is
   renamed only when complete (a failed or disk-full export leaves nothing);
5. the manifest is read back from the archive: digest, layers, sizes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gpubake.errors import BuildError
from gpubake.fsutil import atomic_path
from gpubake.images.builders.base import BuildRequest, BuildResult
from gpubake.images.builders.proc import run_logged
from gpubake.images.builders.storage import Storage, cache_root, default_storage

WHEELS_MOUNT = "/tmp/gpubake-wheels"  # must match provisioning/build/20-python-env.sh
LOCK_FILE = "requirements.lock.txt"  # the lock's name in a rendered context


def _console_step(line: str) -> None:
    from gpubake.console import console

    console.print(f"[dim]{line}[/]", markup=True, highlight=False, soft_wrap=True)


class BuildahBuilder:
    """Builds a rendered context with `buildah bud`; see the module docstring."""

    name = "buildah"

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        no_cache: bool = False,
        on_step: Callable[[str], None] | None = _console_step,
    ) -> None:
        self._storage = storage  # resolved at build time (env may change after construction)
        self.no_cache = no_cache  # rebuild every layer (reproducibility checks)
        self.on_step = on_step  # sees "STEP n/m: ..." lines (progress)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = default_storage()
        return self._storage

    def available(self) -> bool:
        return shutil.which("buildah") is not None and shutil.which("skopeo") is not None

    # ------------------------------------------------------------------ build

    def build(self, req: BuildRequest, on_progress: Callable[[str], None] | None = None) -> BuildResult:
        """Build `req`; `on_progress` (optional) replaces `on_step` for this build."""
        if on_progress is not None:
            saved, self.on_step = self.on_step, on_progress
            try:
                return self.build(req)
            finally:
                self.on_step = saved
        started = time.monotonic()
        ctx = Path(req.context_dir)
        if not (ctx / "Containerfile").is_file():
            raise BuildError(f"build context {ctx}: no Containerfile (render it with gpubake.images.render)")
        if not (ctx / "model").is_dir():
            raise BuildError(f"build context {ctx}: no model/ (gpubake.images.model_layer.prepare_model places it)")
        if not self.available():
            missing = [t for t in ("buildah", "skopeo") if shutil.which(t) is None]
            raise BuildError(f"buildah builder: {', '.join(missing)} not installed (apt-get install buildah skopeo)")
        req.log_file.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.storage.root, self.storage.runroot):
            d.mkdir(parents=True, exist_ok=True)

        if req.spec.base.bootstrap is not None:
            from gpubake.images import bootstrap

            self._step(f"bootstrap base ({req.spec.base.bootstrap.suite})")
            bootstrap.ensure_base(bootstrap.inputs_for(req.spec, req.timestamp), self.storage, log_file=req.log_file)

        wheels = self._download_wheels(ctx / LOCK_FILE, req)
        self._bud(req, ctx, wheels)
        if req.archive is not None:
            digest, layers = self._export(req)
        else:
            digest, layers = self._local_manifest(req)
        return BuildResult(
            digest=digest,
            archive=req.archive,
            layers=layers,
            total_size=sum(int(layer["size"]) for layer in layers),
            builder=self.name,
            seconds=time.monotonic() - started,
        )

    def _step(self, text: str) -> None:
        if self.on_step is not None:
            self.on_step(text)

    def _env(self) -> dict[str, str]:
        return {"BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": self.storage.driver}

    def _download_wheels(self, lock: Path, req: BuildRequest) -> Path:
        """pip-download the lock's wheels on the host (hash-checked, cached per lock)."""
        if not lock.is_file():
            raise BuildError(f"build context {lock.parent}: no {LOCK_FILE}")
        if not _has_requirements(lock):  # nothing to download: mount an empty folder
            empty = cache_root() / "wheels" / "empty"
            empty.mkdir(parents=True, exist_ok=True)
            return empty
        key = hashlib.sha256(lock.read_bytes() + req.spec.python.version.encode()).hexdigest()[:16]
        dest = cache_root() / "wheels" / f"{req.spec.name}-py{req.spec.python.version}-{key}"
        stamp = dest / ".complete"
        if stamp.is_file():
            return dest
        self._step("downloading locked wheels (host pip configuration, hashes checked)")
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
            "--require-hashes", "--only-binary=:all:", "--python-version", req.spec.python.version,
            "--dest", str(dest), "-r", str(lock),
        ]  # fmt: skip
        run_logged(cmd, log_file=req.log_file, what="pip download of the lock")
        stamp.write_text(lock.name + "\n")
        return dest

    def _bud(self, req: BuildRequest, ctx: Path, wheels: Path) -> None:
        cmd = [
            "buildah", *self.storage.buildah_args(), "bud",
            "--isolation", "chroot",
            "--layers",
            "--timestamp", str(req.timestamp),
            "--identity-label=false",
            "--pull=false",
            "--build-arg", f"SOURCE_DATE_EPOCH={req.timestamp}",
            "--volume", f"{wheels}:{WHEELS_MOUNT}:ro",
            "--file", str(ctx / "Containerfile"),
            "--tag", req.tag,
        ]  # fmt: skip
        if self.no_cache:
            cmd.append("--no-cache")
        cmd.append(str(ctx))

        def on_line(line: str) -> None:
            if line.startswith("STEP "):
                self._step(line[:160])

        run_logged(cmd, log_file=req.log_file, what=f"buildah bud of {req.spec.name} ({req.target})", env=self._env(), on_line=on_line)

    def _export(self, req: BuildRequest) -> tuple[str, list[dict]]:
        """Push to an OCI archive atomically; return (manifest digest, layers)."""
        assert req.archive is not None
        self._step(f"exporting {req.archive}")
        with atomic_path(req.archive) as tmp, tempfile.TemporaryDirectory(prefix="gpubake-digest.") as dtmp:
            digest_file = Path(dtmp) / "digest"
            run_logged(
                ["buildah", *self.storage.buildah_args(), "push", "--quiet", "--format", "oci",
                 "--digestfile", str(digest_file), req.tag, f"oci-archive:{tmp}:{req.tag}"],
                log_file=req.log_file,
                what=f"export to {req.archive}",
                env=self._env(),
            )  # fmt: skip
            manifest_digest, manifest = read_archive_manifest(tmp)
            pushed = digest_file.read_text().strip()
            if pushed and pushed != manifest_digest:
                raise BuildError(f"export to {req.archive}: archive manifest {manifest_digest} != pushed {pushed}")
        return manifest_digest, layer_list(manifest)

    def _local_manifest(self, req: BuildRequest) -> tuple[str, list[dict]]:
        return local_manifest(self.storage, req.tag)


def local_manifest(storage: Storage, tag: str) -> tuple[str, list[dict]]:
    """(digest, layers) of `tag` as stored locally (uncompressed layers: no export needed)."""
    out = subprocess.run(["skopeo", "inspect", "--raw", storage.ref(tag)], capture_output=True)
    if out.returncode != 0:
        last = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["skopeo failed"]
        raise BuildError(f"reading back {tag}: {last[0][:300]}")
    raw = out.stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest(), layer_list(json.loads(raw))


def _has_requirements(lock: Path) -> bool:
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            return True
    return False


def layer_list(manifest: dict) -> list[dict]:
    """[{"digest", "size"}] of a manifest's layers, base first."""
    return [{"digest": layer["digest"], "size": int(layer["size"])} for layer in manifest.get("layers", [])]


def read_archive_manifest(archive: Path) -> tuple[str, dict]:
    """(digest, manifest) of the single image in an OCI archive, without unpacking the blobs."""
    try:
        with tarfile.open(archive) as tar:
            index = json.load(_member(tar, "index.json"))
            manifests = index.get("manifests", [])
            if len(manifests) != 1:
                raise BuildError(f"{archive}: expected one image in the OCI archive, found {len(manifests)}")
            digest = manifests[0]["digest"]
            raw = _member(tar, "blobs/sha256/" + digest.split(":", 1)[1]).read()
    except (tarfile.TarError, OSError, KeyError, ValueError) as exc:
        raise BuildError(f"{archive}: not a readable OCI archive ({exc})") from None
    if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
        raise BuildError(f"{archive}: manifest blob does not match its digest {digest}")
    return digest, json.loads(raw)


def _member(tar: tarfile.TarFile, name: str):
    for candidate in (name, "./" + name):
        try:
            fh = tar.extractfile(candidate)
        except KeyError:
            continue
        if fh is not None:
            return fh
    raise KeyError(name)
