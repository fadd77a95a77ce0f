"""`gpubake remote provision USER@HOST --image NAME`: the image's own stack on a bare host.

What the image holds, installed the way its build installs it (provisioning/build/20-*.sh,
30-*.sh), so the host's self-test checks the image's software and not whatever pip
resolves today:

1. refused up front, before anything is written on the host: a driver below the image's
   minimum (`nvidia-smi` over SSH against `compat.min_driver(spec.cuda)`, the floor
   `launch` filters marketplace offers by and the boot self-test checks), and a Python
   other than the one the lock was compiled for;
2. the spec's lock (`python.lock`, copied to the host by SFTP) with
   `pip install --require-hashes --no-deps --only-binary=:all:`: the pinned torch, the
   runtime plan's kernel wheels (fa3-fwd, sageattention, cudnn-frontend are in the lock),
   every file hash-checked; then gpubake's own wheel with `--no-deps` on top;
3. the image's facts (`image.json`, computed here from the spec as `build-image` does);
4. the checkpoint: fetched on the host with `gpubake fetch SRC --sha256 PIN` (the user's
   store: s3://, https://; verified against the pinned manifest), or copied from the
   builder (a local directory, by default the builder's cache of the spec's model):
   verified here against its manifest, uploaded, checked again on the host with
   `sha256sum -c`, and moved into place only when every file matched;
5. the self-test (`gpubake selftest --facts image.json --model-dir ...`), its report
   fetched back (`remote.selftest`).
"""

from __future__ import annotations

import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpubake.console import console
from gpubake.fsutil import sha256_file
from gpubake.images.marketplace.remote import REMOTE_DIR, RemoteError, Session, SshTarget, build_wheel, rquote, selftest
from gpubake.provisioning.facts import version_key

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

_DRIVER = re.compile(r"^\d+(\.\d+){1,3}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FETCH_SCHEMES = ("s3://", "https://", "http://")
LOCK_NAME = "requirements.lock.txt"  # as the image build names it (20-python-env.sh)
SUMS_NAME = "SHA256SUMS"
_PYVER = shlex.quote('import sys; print("%d.%d" % sys.version_info[:2])')


@dataclass(frozen=True)
class Weights:
    """Where the checkpoint comes from: fetched on the host (`uri`) or copied (`local`)."""

    pin: str  # sha256 of the checkpoint's gpubake-manifest.json
    uri: str | None = None
    local: Path | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # local: rel -> {sha256, size}


def host_layout(spec: ImageSpec, venv: str) -> dict[str, str]:
    """Remote paths (under the remote user's home) of one image's stack."""
    root = f"~/{REMOTE_DIR}/images/{spec.name}"
    v = venv.rstrip("/")
    return {"root": root, "lock": f"{root}/{LOCK_NAME}", "facts": f"{root}/image.json", "model": f"{root}/model",
            "venv": v, "python": f"{v}/bin/python", "gpubake": f"{v}/bin/gpubake", "dist": f"~/{REMOTE_DIR}/dist"}


def _sftp(path: str) -> str:
    """A `~/`-path as SFTP takes it (relative to the home directory)."""
    return path[2:] if path.startswith("~/") else path


def min_driver(spec: ImageSpec) -> str | None:
    if spec.cuda == "none":
        return None
    from gpubake.images import compat

    return compat.min_driver(spec.cuda).toolkit


# ------------------------------------------------------------------ weights


def local_weights(root: Path, pin: str | None) -> Weights:
    """A checkpoint directory on this machine, verified against its manifest (and the pin)."""
    from gpubake.provisioning.bake import MANIFEST_NAME, manifest_sha256, read_manifest

    if not (root / MANIFEST_NAME).is_file():
        raise RemoteError(f"--weights: {root} has no {MANIFEST_NAME} to verify it against")
    sha = manifest_sha256(root)
    if pin and sha != pin:
        raise RemoteError(f"--weights-sha256: {root}/{MANIFEST_NAME} is sha256:{sha}, expected {pin}")
    files = read_manifest(root).get("files") or {}
    for rel, entry in sorted(files.items()):
        path = root / rel
        if ".." in Path(rel).parts or path.is_symlink() or not path.is_file():
            raise RemoteError(f"--weights: {rel}: listed in the manifest but not a regular file in {root}")
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise RemoteError(f"--weights: {rel}: does not match {root}/{MANIFEST_NAME}")
    return Weights(pin=sha, local=root, files=dict(files))


def resolve_weights(spec: ImageSpec, source: str | None, pin: str | None, *, dry_run: bool = False) -> Weights:
    """`--weights` (a URI fetched on the host, or a local directory), else the builder's cache."""
    pin = pin or spec.model.sha256
    if pin is not None and not _SHA256.match(pin):
        raise RemoteError(f"--weights-sha256: not a sha256 (64 lowercase hex): {pin!r}")
    if source and source.startswith(FETCH_SCHEMES):
        if any(c.isspace() for c in source):
            raise RemoteError(f"--weights: not a URI: {source!r}")
        if not pin:
            raise RemoteError(f"--weights-sha256: needed to verify {source} on the host "
                              "(the sha256 of its gpubake-manifest.json); an unverified checkpoint is not installed")
        return Weights(pin=pin, uri=source)
    if source and "://" in source:
        raise RemoteError(f"--weights: {source}: fetch from {', '.join(FETCH_SCHEMES)} or copy a local directory")
    if source:
        path = Path(source)
        if not path.is_dir():
            raise RemoteError(f"--weights: no such directory: {path}")
        return local_weights(path, pin)
    from gpubake.images import model_layer
    from gpubake.images.builders.storage import cache_root
    from gpubake.provisioning.bake import MANIFEST_NAME

    cached = cache_root() / "models" / model_layer.model_key(spec)
    if not (cached / MANIFEST_NAME).is_file():
        if spec.model.source != "generate:tiny":
            raise RemoteError(f"--weights: the builder has no checkpoint of {spec.name} cached ({cached}); "
                              "pass --weights s3://...|https://...|DIR, or build the image first")
        if dry_run:
            return Weights(pin=pin or "<manifest sha256>", local=cached)
        cached = model_layer.cached_model(spec)  # seconds: generated, not fetched
    return local_weights(cached, pin)


def sums_text(weights: Weights) -> str:
    """`sha256sum -c` input for a copied checkpoint: every file and the manifest itself."""
    from gpubake.provisioning.bake import MANIFEST_NAME

    lines = [f"{e['sha256']}  {rel}" for rel, e in sorted(weights.files.items())]
    lines.append(f"{weights.pin}  {MANIFEST_NAME}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the commands


def _pip_args(pip_args: str) -> str:
    try:
        return " ".join(shlex.quote(a) for a in shlex.split(pip_args))
    except ValueError as exc:
        raise RemoteError(f"--pip-args: {exc}") from None


def commands(spec: ImageSpec, wheel_name: str, weights: Weights, *, venv: str, python: str, pip_args: str,
             nvidia_smi: str) -> dict[str, str]:
    """Every remote shell command of `provision`, by step (also what --dry-run prints)."""
    lay = host_layout(spec, venv)
    extra = _pip_args(pip_args)
    pip = f"{rquote(lay['python'])} -m pip install --disable-pip-version-check -q"
    vpy = rquote(lay["python"])
    py = shlex.quote(python)
    cmds = {
        "driver": f"{shlex.quote(nvidia_smi)} --query-gpu=driver_version --format=csv,noheader",
        "python": f"if test -x {vpy}; then {vpy} -c {_PYVER}; else {py} -c {_PYVER}; fi",
        "mkdir": f"mkdir -p {rquote(lay['root'])} {rquote(lay['dist'])}",
        "venv": f"test -x {vpy} || {py} -m venv {rquote(lay['venv'])}",
        "lock": " ".join(x for x in (pip, "--require-hashes --no-deps --only-binary=:all:", extra,
                                     "-r", rquote(lay["lock"])) if x),
        "gpubake": " ".join(x for x in (pip, "--no-deps --force-reinstall", extra,
                                        rquote(f"{lay['dist']}/{wheel_name}")) if x),
        "version": f"{rquote(lay['gpubake'])} --version",
        "have_model": f"sha256sum {rquote(lay['model'] + '/gpubake-manifest.json')}",
    }
    model, partial = rquote(lay["model"]), rquote(lay["model"] + ".partial")
    if weights.uri:
        cmds["weights"] = (f"rm -rf {model} && {rquote(lay['gpubake'])} fetch {shlex.quote(weights.uri)} {model} "
                           f"--sha256 {weights.pin} --json")
    else:
        cmds["weights"] = (f"cd {partial} && sha256sum --quiet --strict -c {SUMS_NAME} && rm -f {SUMS_NAME} "
                           f"&& rm -rf {model} && mv {partial} {model}")
    cmds["selftest"] = (f"{rquote(lay['gpubake'])} selftest --json --facts {rquote(lay['facts'])} "
                        f"--model-dir {rquote(lay['model'])} --report ...")
    return cmds


# ------------------------------------------------------------------ checks on the host


def check_driver(s: Session, spec: ImageSpec, cmd: str) -> str | None:
    """The host's (lowest) NVIDIA driver; RemoteError when it is below the image's minimum."""
    need = min_driver(spec)
    if need is None:
        return None
    where = s.target.display
    result = s.run(cmd, timeout=60, what="nvidia-smi")
    if result.exited == 127:
        raise RemoteError(f"{where}: no nvidia-smi (no NVIDIA driver?); image {spec.name} needs driver >= {need} "
                          f"(CUDA {spec.cuda}); nothing installed (--nvidia-smi PATH if it is off the PATH)")
    versions = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.exited != 0 or not versions or not all(_DRIVER.match(v) for v in versions):
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        raise RemoteError(f"{where}: nvidia-smi gave no driver version (exit {result.exited}): {tail[0][:200]}")
    have = min(versions, key=version_key)
    if version_key(have) < version_key(need):
        raise RemoteError(f"{where}: driver {have} is below {need}, the minimum for image {spec.name} "
                          f"(CUDA {spec.cuda}); nothing installed")
    return have


def check_python(s: Session, spec: ImageSpec, cmd: str, python: str) -> str:
    have = s.check(cmd, what="python version", timeout=60).strip()
    if have != spec.python.version:
        raise RemoteError(f"--python: {python} on {s.target.display} is Python {have}, but image {spec.name}'s lock "
                          f"is for Python {spec.python.version}; nothing installed")
    return have


# ------------------------------------------------------------------ provision


def provision(target: SshTarget, spec: ImageSpec, *, weights_source: str | None = None, weights_sha256: str | None = None,
              wheel: Path | None = None, venv: str = "~/.gpubake/venv", python: str = "python3", pip_args: str = "",
              nvidia_smi: str = "nvidia-smi", run_selftest: bool = True, quick: bool = False,
              local_report: Path | None = None, dry_run: bool = False, selftest_timeout: float = 3600.0) -> dict[str, Any]:
    """Install `spec`'s stack on the host, then run its self-test; the result object of `--json`."""
    from gpubake.images.render import image_facts
    from gpubake.images.spec import check_lock

    if wheel is not None and not (wheel.is_file() and wheel.name.endswith(".whl")):
        raise RemoteError(f"--wheel: not a wheel file: {wheel}")
    check_lock(spec.lock_path, source=spec.name)  # pinned with hashes, or one line naming the lock
    weights = resolve_weights(spec, weights_source, weights_sha256, dry_run=dry_run)
    lay = host_layout(spec, venv)
    with tempfile.TemporaryDirectory(prefix="gpubake-provision-") as tmp:
        if wheel is None and dry_run:
            wheel_name = "gpubake-<version>-py3-none-any.whl"
        else:
            wheel = wheel or build_wheel(Path(tmp))
            wheel_name = wheel.name
        cmds = commands(spec, wheel_name, weights, venv=venv, python=python, pip_args=pip_args, nvidia_smi=nvidia_smi)
        result: dict[str, Any] = {
            "host": target.display, "image": spec.name, "venv": venv, "wheel": wheel_name, "lock": str(spec.lock_path),
            "weights": weights.uri or str(weights.local), "weights_sha256": weights.pin, "min_driver": min_driver(spec),
            "commands": cmds, "dry_run": dry_run,
        }
        if dry_run:
            return result
        assert wheel is not None
        facts = Path(tmp) / "image.json"
        image_facts(spec, None).write(facts)
        with Session(target) as s:
            result["driver"] = check_driver(s, spec, cmds["driver"])
            result["python"] = check_python(s, spec, cmds["python"], python)
            s.check(cmds["mkdir"], what="mkdir")
            s.put(spec.lock_path, _sftp(lay["lock"]))
            s.put(facts, _sftp(lay["facts"]))
            s.put(wheel, _sftp(f"{lay['dist']}/{wheel_name}"))
            s.check(cmds["venv"], what="creating the virtualenv", timeout=300)
            console.print(f"installing {spec.python.lock} (hash-checked) on {target.display}", markup=False)
            s.check(cmds["lock"], what=f"pip install --require-hashes -r {LOCK_NAME}", timeout=3600)
            s.check(cmds["gpubake"], what=f"pip install {wheel_name}", timeout=600)
            result["version"] = s.check(cmds["version"], what="gpubake --version").strip()
            result["weights_action"] = _install_weights(s, weights, cmds, lay, Path(tmp))
    if run_selftest:
        report = local_report or Path(f"selftest-{target.host}.json")
        result["selftest"] = selftest(target, gpubake=lay["gpubake"], local_report=report, quick=quick,
                                      facts=lay["facts"], model_dir=lay["model"], timeout=selftest_timeout)
    return result


def _install_weights(s: Session, weights: Weights, cmds: dict[str, str], lay: dict[str, str], tmp: Path) -> str:
    """Put the verified checkpoint at the host's model directory; 'kept', 'fetched' or 'copied'."""
    have = s.run(cmds["have_model"], what="sha256sum", timeout=120)
    if have.exited == 0 and have.stdout.split()[:1] == [weights.pin]:
        return "kept"  # the same manifest is there already (its files are checked by the self-test)
    if weights.uri:
        console.print(f"fetching {weights.uri} on {s.target.display} (verified against sha256:{weights.pin[:12]}…)",
                      markup=False)
        s.check(cmds["weights"], what="fetching the checkpoint", timeout=6 * 3600)
        return "fetched"
    assert weights.local is not None
    from gpubake.provisioning.bake import MANIFEST_NAME

    partial = lay["model"] + ".partial"
    rels = sorted(weights.files)
    dirs = sorted({str(Path(partial, r).parent) for r in [*rels, MANIFEST_NAME]})
    s.check(f"rm -rf {rquote(partial)} && mkdir -p " + " ".join(rquote(d) for d in dirs), what="mkdir")
    total = sum(int(e.get("size") or 0) for e in weights.files.values())
    console.print(f"copying the checkpoint ({len(rels)} files, {total / 1e9:.2f} GB) to {s.target.display}", markup=False)
    for rel in [*rels, MANIFEST_NAME]:
        s.put(weights.local / rel, _sftp(f"{partial}/{rel}"))
    sums = tmp / SUMS_NAME
    sums.write_text(sums_text(weights), encoding="utf-8")
    s.put(sums, _sftp(f"{partial}/{SUMS_NAME}"))
    s.check(cmds["weights"], what="verifying the copied checkpoint (sha256sum -c)", timeout=3600)
    return "copied"
