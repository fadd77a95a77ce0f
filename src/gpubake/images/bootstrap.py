"""The `bootstrap` base: a Debian root file system built by debootstrap, as an OCI image.

Why: base images cannot be pulled everywhere (offline builders, this project's CI), but
Debian's mirror can be reached; a spec with `[base.bootstrap]` gets a minimal Debian
(`--variant=minbase` + its `packages`) built here, then every build reuses it.

Deterministic by construction: debootstrap runs with SOURCE_DATE_EPOCH, the files that
record the moment or the host (logs, apt lists and caches, *-old/backup databases,
machine-id, ldconfig aux-cache, hostname, resolv.conf, shadow "last change" days) are
removed or reset, and the tree is packed by GNU tar with the reproducible-builds recipe
(sorted names, numeric owners, mtimes clamped to the epoch, no atime/ctime). The single
layer goes into an OCI image layout written here (four small JSON files: hand-written
because no tool makes a config with a fixed `created` from a tar), cached under
`~/.cache/gpubake/bootstrap/<key>` where the key hashes every input. Same inputs and the
same mirror state give the same layer digest; the cache keeps one build for later ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gpubake import envs
from gpubake.errors import BuildError
from gpubake.fsutil import atomic_path, sha256_file
from gpubake.images.builders.base import Step
from gpubake.images.builders.proc import execute
from gpubake.images.builders.storage import Storage, cache_root

RECIPE_VERSION = 1  # bump when the recipe below changes what ends up in the layer
DEFAULT_MIRROR = "http://deb.debian.org/debian"  # without a spec mirror or $GPUBAKE_DEBIAN_MIRROR
VARIANT = "minbase"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Paths whose contents are runtime state, never image content (kept as empty dirs).
_EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp", "var/tmp", "var/lib/apt/lists", "var/cache/apt", "var/cache/ldconfig")
# Files that record the host or the moment of the build.
_DROP_FILES = (
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/passwd-",
    "etc/group-",
    "etc/subuid-",
    "etc/subgid-",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/statoverride-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/passwords.dat-old",
)
# Secrets that must differ per instance (a base with openssh-server): the start script
# makes new host keys at boot (ssh-keygen -A), so no two instances share one.
_DROP_GLOBS = ("etc/ssh/ssh_host_*",)
# Files the container runtime provides at run time; left empty so mounts have a target.
_EMPTY_FILES = ("etc/hostname", "etc/resolv.conf")


@dataclass(frozen=True)
class BootstrapInputs:
    """Everything that decides the bytes of the base layer."""

    suite: str
    packages: tuple[str, ...]
    epoch: int
    mirror: str = DEFAULT_MIRROR
    arch: str = ""

    def normalised(self) -> BootstrapInputs:
        return BootstrapInputs(
            suite=self.suite,
            packages=tuple(sorted(set(self.packages))),
            epoch=int(self.epoch),
            mirror=self.mirror.rstrip("/"),
            arch=self.arch or debian_arch(),
        )

    def key(self) -> str:
        """sha256 over the inputs and the recipe version (the cache key)."""
        n = self.normalised()
        doc = {
            "recipe": RECIPE_VERSION,
            "variant": VARIANT,
            "suite": n.suite,
            "packages": list(n.packages),
            "epoch": n.epoch,
            "mirror": n.mirror,
            "arch": n.arch,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def ref(self) -> str:
        """The local image name the base gets in containers-storage."""
        return f"localhost/gpubake/bootstrap-{self.suite}:{self.key()[:16]}"


def debian_arch() -> str:
    """Debian/OCI architecture name of this machine (amd64, arm64)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def mirror_for(spec) -> str:
    """debootstrap's mirror: $GPUBAKE_DEBIAN_MIRROR when set (a machine that cannot reach the
    spec's snapshot), else the spec's dated `base.apt_mirror`, else deb.debian.org."""
    return envs.raw("GPUBAKE_DEBIAN_MIRROR") or spec.base.apt_mirror or DEFAULT_MIRROR


def inputs_for(spec, epoch: int) -> BootstrapInputs:
    """Bootstrap inputs of an `ImageSpec` with a `[base.bootstrap]` table."""
    bs = spec.base.bootstrap
    if bs is None:
        raise BuildError(f"spec {spec.name}: base.bootstrap is not set")
    mirror = mirror_for(spec)
    return BootstrapInputs(suite=bs.suite, packages=tuple(bs.packages), epoch=epoch, mirror=mirror).normalised()


def layout_dir(inputs: BootstrapInputs) -> Path:
    return cache_root() / "bootstrap" / inputs.key() / "oci"


# ----------------------------------------------------------------------------- rootfs


def _reset_shadow_days(path: Path, epoch: int) -> None:
    """Set the "last password change" field (days since 1970) to the epoch's day."""
    if not path.exists():
        return
    day = str(epoch // 86400)
    out = []
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2]:
            fields[2] = day
        out.append(":".join(fields))
    path.write_text("\n".join(out) + "\n")


def normalise_rootfs(root: Path, epoch: int) -> None:
    """Remove or reset everything in `root` that records the host or the build moment."""
    for rel in _EMPTY_DIRS:
        d = root / rel
        if d.is_dir() and not d.is_symlink():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    # apt expects these to exist (apt-get update recreates the rest)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    for rel in _DROP_FILES:
        (root / rel).unlink(missing_ok=True)
    for pattern in _DROP_GLOBS:
        for path in root.glob(pattern):
            path.unlink()
    for rel in _EMPTY_FILES:
        p = root / rel
        if p.exists() or p.is_symlink():
            p.unlink()
        p.write_bytes(b"")
    # Logs: keep the files (some need their mode/owner) but empty them.
    log_dir = root / "var/log"
    if log_dir.is_dir():
        for p in sorted(log_dir.rglob("*")):
            if p.is_file() and not p.is_symlink():
                p.write_bytes(b"")
    _reset_shadow_days(root / "etc/shadow", epoch)


def write_names(root: Path, names_file: Path) -> None:
    """The top-level entries of `root`, sorted, NUL-separated: what `pack_argv` packs."""
    entries = sorted(os.listdir(root))
    if not entries:
        raise BuildError(f"bootstrap: {root} is empty, nothing to pack")
    names_file.write_bytes(b"".join(name.encode() + b"\0" for name in entries))


def pack_argv(root: Path, dest: Path, epoch: int, names_file: Path) -> list[str]:
    """GNU tar with the reproducible-builds recipe, packing the entries `write_names` listed.

    The list is read from a file (not argv) so that the command is known before debootstrap
    has made the tree; the archive is the same bytes as naming the entries in argv.
    """
    return [
        "tar",
        "--create",
        "--file",
        str(dest),
        "--directory",
        str(root),
        "--sort=name",
        "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        f"--mtime=@{epoch}",
        "--clamp-mtime",
        "--numeric-owner",
        "--xattrs",
        "--null",
        "--verbatim-files-from",
        "--files-from",
        str(names_file.absolute()),
    ]


PACK_ENV = {"LC_ALL": "C"}


def pack_rootfs(root: Path, dest: Path, epoch: int) -> None:
    """Pack `root` into an uncompressed, reproducible tar (GNU tar, reproducible-builds recipe)."""
    with tempfile.TemporaryDirectory(prefix="gpubake-pack.") as tmp:
        names = Path(tmp) / "names"
        write_names(root, names)
        proc = subprocess.run(pack_argv(root, dest, epoch, names), capture_output=True, text=True, env={**os.environ, **PACK_ENV})
    if proc.returncode != 0:
        raise BuildError(f"bootstrap: tar failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")


# ----------------------------------------------------------------------------- OCI layout


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{digest}"


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_oci_layout(layout: Path, layer_tar: Path, inputs: BootstrapInputs) -> str:
    """Write a one-layer OCI image layout around `layer_tar` (moved in); return the manifest digest."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layer_digest = sha256_file(layer_tar)
    layer_size = layer_tar.stat().st_size
    os.replace(layer_tar, blobs / layer_digest)
    created = datetime.fromtimestamp(inputs.epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "created": created,
        "architecture": inputs.arch,
        "os": "linux",
        "config": {"Env": [f"PATH={DEFAULT_PATH}", "LANG=C.UTF-8"], "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [
            {
                "created": created,
                "created_by": f"gpubake bootstrap: debootstrap --variant={VARIANT} "
                f"--include={','.join(inputs.packages)} {inputs.suite} {inputs.mirror}",
            }
        ],
    }
    config_bytes = _canonical(config)
    config_digest = _blob(layout, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{layer_digest}", "size": layer_size}
        ],
    }
    manifest_bytes = _canonical(manifest)
    manifest_digest = _blob(layout, manifest_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": inputs.ref().split(":")[-1]},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest


# ----------------------------------------------------------------------------- public API


def debootstrap_argv(inputs: BootstrapInputs, rootfs: Path) -> list[str]:
    """The debootstrap command that makes the base's tree in `rootfs`."""
    cmd = ["debootstrap", f"--variant={VARIANT}", f"--arch={inputs.arch}"]
    if inputs.packages:
        cmd.append(f"--include={','.join(inputs.packages)}")
    return [*cmd, inputs.suite, str(rootfs), inputs.mirror]


def layout_steps(inputs: BootstrapInputs) -> list[Step]:
    """The commands that build the base's OCI layout (debootstrap, tar); none when it is cached.

    They work in `<key>/work` (one bootstrap of a key at a time); the layout appears under
    its final name only when complete, and `work` is removed after success or failure.
    """
    inputs = inputs.normalised()
    dest = layout_dir(inputs)
    if (dest / "index.json").is_file():
        return []
    work = dest.parent / "work"
    rootfs, names, layer = work / "rootfs", work / "names", work / "layer.tar"

    def prepare() -> None:
        if os.geteuid() != 0:
            raise BuildError("bootstrap base: debootstrap needs root; run as root or give the spec a pinned base.image")
        if shutil.which("debootstrap") is None:
            raise BuildError("bootstrap base: debootstrap is not installed (apt-get install debootstrap, or run scripts/setup.sh)")
        shutil.rmtree(work, ignore_errors=True)  # what an interrupted run left
        work.mkdir(parents=True)

    def normalise(_output: str) -> None:
        normalise_rootfs(rootfs, inputs.epoch)
        write_names(rootfs, names)

    def place(_output: str) -> None:
        shutil.rmtree(rootfs)
        with atomic_path(dest) as tmp_layout:
            tmp_layout.mkdir()
            write_oci_layout(tmp_layout, layer, inputs)
        shutil.rmtree(work, ignore_errors=True)

    debootstrap_env = {"SOURCE_DATE_EPOCH": str(inputs.epoch), "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    return [
        Step(
            what=f"bootstrap base ({inputs.suite})",
            argv=tuple(debootstrap_argv(inputs, rootfs)),
            env=debootstrap_env,
            before=prepare,
            then=normalise,
            undo=lambda: shutil.rmtree(work, ignore_errors=True),
        ),
        Step(what=f"pack bootstrap base ({inputs.suite})", argv=tuple(pack_argv(rootfs, layer, inputs.epoch, names)), env=PACK_ENV, then=place),
    ]


def build_layout(inputs: BootstrapInputs, *, log_file: Path) -> Path:
    """Build (or reuse from the cache) the OCI layout of the bootstrap base; return its dir."""
    execute(layout_steps(inputs), log_file=log_file)
    return layout_dir(inputs.normalised())


def image_present(storage: Storage, ref: str) -> bool:
    """Whether `ref` already exists in `storage` (a read-only probe; a store not made yet holds nothing)."""
    if not storage.root.is_dir() or shutil.which("buildah") is None:
        return False
    proc = subprocess.run(
        ["buildah", *storage.buildah_args(), "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def import_steps(inputs: BootstrapInputs, destination: str, what: str) -> list[Step]:
    """Build the layout if needed, then `skopeo copy` it to `destination` (a skopeo reference)."""
    inputs = inputs.normalised()
    copy = Step(what=what, argv=("skopeo", "copy", "--quiet", f"oci:{layout_dir(inputs)}", destination))
    return [*layout_steps(inputs), copy]


def storage_steps(inputs: BootstrapInputs, storage: Storage) -> list[Step]:
    """What makes the base available in `storage` under `inputs.ref()`: nothing when it is there."""
    inputs = inputs.normalised()
    ref = inputs.ref()
    if image_present(storage, ref):
        return []
    return import_steps(inputs, storage.ref(ref), "import bootstrap base")


def ensure_base(inputs: BootstrapInputs, storage: Storage, *, log_file: Path) -> str:
    """Make the bootstrap base available in `storage` under `inputs.ref()`; return the ref."""
    execute(storage_steps(inputs, storage), log_file=log_file)
    return inputs.normalised().ref()
