"""The default builder: buildah, daemonless, chroot isolation, overlay storage (vfs where it cannot mount).

Why buildah: it needs no daemon and no privileges beyond root in a plain VM or CI
container, and `buildah bud --timestamp` makes image configs and layer mtimes fixed,
which is what reproducible digests need. The flow:

1. a `[base.bootstrap]` base is built or reused (`gpubake.images.bootstrap`);
2. the lock's wheels are downloaded on the host with the host's pip configuration
   (`pip download --require-hashes`, cached per lock) and mounted read-only into the
   build at /tmp/gpubake-wheels: the build needs no network and names no host path;
3. `buildah bud --layers --timestamp SOURCE_DATE_EPOCH` builds the rendered context;
4. `buildah push` writes `dist/<name>-<target>.oci.tar` (layers compressed with
   `req.compression`: zstd by default, zstd:chunked or gzip) through a temporary name that
   is renamed only when complete (a failed or disk-full export leaves nothing);
5. the manifest is read back from the archive: digest, layers, sizes.

Each command of 1-4 is a `Step` of `plan(req)` (none for what is cached); `build(req)`
runs that plan through `proc.execute`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from gpubake.errors import BuildError
from gpubake.fsutil import partial_path, place_partial
from gpubake.images.builders import proc, wheels
from gpubake.images.builders.base import BuildRequest, BuildResult, ProgressFn, Step
from gpubake.images.builders.storage import Storage, cache_root, default_storage

WHEELS_MOUNT = "/tmp/gpubake-wheels"  # must match provisioning/build/20-python-env.sh
LOCK_FILE = "requirements.lock.txt"  # the lock's name in a rendered context


def _console_step(line: str) -> None:
    from gpubake.console import console

    console.print(f"[dim]{line}[/]", markup=True, highlight=False, soft_wrap=True)


class BuildahBuilder:
    """Builds a rendered context with `buildah bud`; see the module docstring."""

    name = "buildah"
    install_hint = "install buildah and skopeo (apt-get install buildah skopeo, or run scripts/setup.sh)"

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        no_cache: bool = False,
        on_step: ProgressFn | None = _console_step,
        runner: proc.Runner | None = None,
    ) -> None:
        self._storage = storage  # resolved at build time (env may change after construction)
        self.no_cache = no_cache  # rebuild every layer (reproducibility checks)
        self.on_step = on_step  # sees each step and "STEP n/m: ..." line (progress)
        self.runner = runner  # the process runner (None: proc.run_step)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = default_storage()
        return self._storage

    def available(self) -> bool:
        return shutil.which("buildah") is not None and shutil.which("skopeo") is not None

    # ------------------------------------------------------------------ plan

    def plan(self, req: BuildRequest) -> list[Step]:
        """Bootstrap base (if missing), lock wheels (if not cached), `buildah bud`, export."""
        return self._plan(req)[0]

    def _plan(self, req: BuildRequest) -> tuple[list[Step], dict]:
        """The steps, and the dict their hooks fill with the manifest digest and layers."""
        out: dict = {}
        steps: list[Step] = []
        if req.spec.base.bootstrap is not None:
            from gpubake.images import bootstrap

            steps += bootstrap.storage_steps(bootstrap.inputs_for(req.spec, req.timestamp), self.storage)
        wheels, download = self._wheel_steps(req)
        steps += download
        steps.append(self._bud_step(req, wheels))
        steps.append(self._export_step(req, out) if req.archive is not None else self._read_back_step(req, out))
        return steps, out

    def _env(self) -> dict[str, str]:
        return {"BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": self.storage.driver}

    def _wheel_steps(self, req: BuildRequest) -> tuple[Path, list[Step]]:
        """The wheel folder to mount, and the `pip download`s that fill it unless it is cached.

        Wheels are downloaded on the host with the host's pip configuration (a local wheel
        folder, a private index) and the indexes the lock names, hash-checked, cached per
        lock. Pins with a local version (`+cpu`) are downloaded with the lock's extra indexes,
        the rest without them (`builders.wheels`). Before rendering (a dry run) the lock is
        the spec's, which render copies into the context unchanged.
        """
        lock = Path(req.context_dir) / LOCK_FILE
        if not lock.is_file():
            lock = req.spec.lock_path
        if not _has_requirements(lock):  # nothing to download: mount an empty folder
            return cache_root() / "wheels" / "empty", []
        text = lock.read_bytes()
        key = hashlib.sha256(text + req.spec.python.version.encode()).hexdigest()[:16]
        dest = cache_root() / "wheels" / f"{req.spec.name}-py{req.spec.python.version}-{key}"
        stamp = dest / ".complete"
        if stamp.is_file():
            return dest, []
        base = [
            sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
            "--require-hashes", "--only-binary=:all:", "--python-version", req.spec.python.version,
            "--dest", str(dest), "-r",
        ]  # fmt: skip
        split = wheels.parse_lock(text.decode("utf-8")).split()
        if split is None:
            return dest, [Step(
                what="pip download of the lock",
                argv=(*base, str(Path(req.context_dir) / LOCK_FILE)),
                before=lambda: dest.mkdir(parents=True, exist_ok=True),
                then=lambda _out: stamp.write_text(LOCK_FILE + "\n"),
            )]
        reqs = dest.parent / f".{dest.name}.requirements"  # beside the folder: not mounted into the build
        local, public = reqs / "local-versions.txt", reqs / "index.txt"

        def write() -> None:
            dest.mkdir(parents=True, exist_ok=True)
            reqs.mkdir(parents=True, exist_ok=True)
            local.write_text(split[0], encoding="utf-8")
            public.write_text(split[1], encoding="utf-8")

        steps = [Step(what="pip download of the lock's local-version pins (its extra indexes)", argv=(*base, str(local)),
                      before=write)]
        if split[1]:
            steps.append(Step(what="pip download of the lock (its index)", argv=(*base, str(public))))
        last = steps[-1]
        steps[-1] = Step(what=last.what, argv=last.argv, before=last.before,
                         then=lambda _out: stamp.write_text(LOCK_FILE + "\n"))
        return dest, steps

    def _bud_step(self, req: BuildRequest, wheels: Path) -> Step:
        ctx = Path(req.context_dir)
        cmd = [
            "buildah", *self.storage.buildah_args(), "bud",
            "--isolation", "chroot",
            "--layers",
            "--force-rm",  # a failed step's container goes too: no copy of the tree (or a mount) left behind
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
        return Step(
            what=f"buildah bud of {req.spec.name} ({req.target})",
            argv=tuple(cmd),
            env=self._env(),
            before=lambda: wheels.mkdir(parents=True, exist_ok=True),
            watch=lambda line: line[:160] if line.startswith("STEP ") else None,
        )

    def _export_step(self, req: BuildRequest, out: dict) -> Step:
        """`buildah push` to the archive's partial name, checked, renamed only when complete."""
        archive = req.archive
        assert archive is not None
        tmp = partial_path(archive)
        digest_file = archive.parent / f".{archive.name}.digest"

        def before() -> None:
            archive.parent.mkdir(parents=True, exist_ok=True)
            clean()

        def clean() -> None:
            tmp.unlink(missing_ok=True)
            digest_file.unlink(missing_ok=True)

        def place(_output: str) -> None:
            manifest_digest, manifest = read_archive_manifest(tmp)
            pushed = digest_file.read_text().strip()
            if pushed and pushed != manifest_digest:
                raise BuildError(f"export to {archive}: archive manifest {manifest_digest} != pushed {pushed}")
            place_partial(archive)
            digest_file.unlink()
            out.update(digest=manifest_digest, layers=layer_list(manifest))

        return Step(
            what=f"export to {archive}",
            argv=("buildah", *self.storage.buildah_args(), "push", "--quiet", "--format", "oci",
                  "--compression-format", req.compression,
                  "--digestfile", str(digest_file), req.tag, f"oci-archive:{tmp}:{req.tag}"),
            env=self._env(),
            before=before,
            then=place,
            undo=clean,
        )  # fmt: skip

    def _read_back_step(self, req: BuildRequest, out: dict) -> Step:
        """No archive asked for: read the stored manifest (uncompressed layers, no export)."""

        def read(raw: str) -> None:
            out["digest"], out["layers"] = manifest_summary(raw.encode())

        return Step(
            what=f"reading back {req.tag}", argv=("skopeo", "inspect", "--raw", self.storage.ref(req.tag)), stdout_only=True, then=read
        )

    # ------------------------------------------------------------------ build

    def build(self, req: BuildRequest, on_progress: ProgressFn | None = None) -> BuildResult:
        """Run `plan(req)`; `on_progress` (optional) replaces `on_step` for this build."""
        started = time.monotonic()
        ctx = Path(req.context_dir)
        if not (ctx / "Containerfile").is_file():
            raise BuildError(f"build context {ctx}: no Containerfile (render it with gpubake.images.render)")
        if req.spec.model.at == "build" and not (ctx / "model").is_dir():
            raise BuildError(f"build context {ctx}: no model/ (gpubake.images.model_layer.prepare_model places it)")
        if not (ctx / LOCK_FILE).is_file():
            raise BuildError(f"build context {ctx}: no {LOCK_FILE}")
        if not self.available():
            missing = [t for t in ("buildah", "skopeo") if shutil.which(t) is None]
            raise BuildError(f"buildah builder: {', '.join(missing)} not installed (apt-get install buildah skopeo)")
        req.log_file.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.storage.root, self.storage.runroot):
            d.mkdir(parents=True, exist_ok=True)
        steps, out = self._plan(req)
        proc.execute(steps, log_file=req.log_file, runner=self.runner, on_progress=on_progress or self.on_step)
        layers = out["layers"]
        return BuildResult(
            digest=out["digest"],
            archive=req.archive,
            layers=layers,
            total_size=sum(int(layer["size"]) for layer in layers),
            builder=self.name,
            seconds=time.monotonic() - started,
            storage_driver=self.storage.driver,
        )


def local_manifest(storage: Storage, tag: str) -> tuple[str, list[dict]]:
    """(digest, layers) of `tag` as stored locally (uncompressed layers: no export needed)."""
    out = subprocess.run(["skopeo", "inspect", "--raw", storage.ref(tag)], capture_output=True)
    if out.returncode != 0:
        last = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["skopeo failed"]
        raise BuildError(f"reading back {tag}: {last[0][:300]}")
    return manifest_summary(out.stdout)


def manifest_summary(raw: bytes) -> tuple[str, list[dict]]:
    """(digest, layers) of a raw manifest."""
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
