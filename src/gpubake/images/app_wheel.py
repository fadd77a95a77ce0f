"""gpubake's own wheel for an image, built from the repository's tracked files only.

Why a wheel and not a copy of the package directory: a directory copy takes whatever lies
in it (a stray `.env`, an editor's backup, a nested checkout's `.git/credentials`) into an
image layer. The wheel holds exactly what the project's build definition (pyproject.toml)
packs, from a clean export of:

- a git checkout: the files `git ls-files` lists (pyproject.toml, README.md, src/gpubake/),
  with their content as in the working tree; untracked files are left out (and reported);
- an installed gpubake (no checkout): the installed package's files, without dotfiles,
  `__pycache__` or `*.pyc`; pyproject.toml is written from the installed metadata.

Either way no path component starting with `.` and no symlink is exported. The wheel is
built by pip with the project's own backend (setuptools, `--no-build-isolation
--no-index`: no network) with a fixed SOURCE_DATE_EPOCH, so the same files give the same
wheel bytes; it is cached in `<cache>/app-wheels/<key>/`, the key hashing every exported
file with its mode, and the versions of setuptools, Python and zlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from gpubake.errors import GpubakeError
from gpubake.fsutil import atomic_path, sha256_file

# 1980-01-01: the earliest date a zip entry can hold. Fixed, so the wheel's bytes depend
# only on its files (the image's own SOURCE_DATE_EPOCH still dates its layers).
WHEEL_EPOCH = 315532800
RECIPE = 1
_TOP_FILES = ("pyproject.toml", "README.md")


class WheelError(GpubakeError):
    """gpubake's wheel could not be built (no pip/setuptools, a failing build)."""


@dataclass(frozen=True)
class ExportFile:
    rel: str  # path in the export (src/gpubake/..., pyproject.toml)
    source: Path | None  # file to copy, or None when `text` is the content
    mode: int  # 0o644 or 0o755
    text: str | None = None

    def digest(self) -> str:
        if self.text is not None:
            return hashlib.sha256(self.text.encode("utf-8")).hexdigest()
        assert self.source is not None
        return sha256_file(self.source)


@dataclass(frozen=True)
class AppWheel:
    """The wheel placed in a build context."""

    path: Path
    sha256: str
    origin: str  # "git" | "installed"
    left_out: list[str] = field(default_factory=list)  # untracked files under src/gpubake

    @property
    def name(self) -> str:
        return self.path.name


def package_dir() -> Path:
    import gpubake

    return Path(gpubake.__file__).resolve().parent


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in Path(rel).parts)


def _git(root: Path, *args: str) -> bytes | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def checkout_root(pkg: Path | None = None) -> Path | None:
    """The git checkout whose `src/gpubake` is the imported package, else None."""
    pkg = pkg or package_dir()
    root = pkg.parent.parent
    if pkg.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(os.fsdecode(top.strip())).resolve() != root.resolve():
        return None
    return root


def _git_files(root: Path) -> tuple[list[ExportFile], list[str]]:
    listing = _git(root, "ls-files", "-z", "--stage", "--", *_TOP_FILES, "src/gpubake")
    if listing is None:
        raise WheelError(f"{root}: git ls-files failed")
    files: list[ExportFile] = []
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        meta, _, raw = entry.partition(b"\t")
        rel = os.fsdecode(raw)
        mode = meta.split(b" ", 1)[0]
        path = root / rel
        # regular files only: a tracked symlink could point anywhere on the host
        if mode not in (b"100644", b"100755") or _hidden(rel) or path.is_symlink() or not path.is_file():
            continue
        files.append(ExportFile(rel, path, 0o755 if mode == b"100755" else 0o644))
    others = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", "src/gpubake") or b""
    left_out = sorted(rel for rel in map(os.fsdecode, others.split(b"\0")) if rel and not _hidden(rel))
    return files, left_out


def _installed_pyproject() -> str:
    """A pyproject.toml for an installed gpubake, from its metadata (name, version, deps, scripts)."""
    from importlib import metadata

    from gpubake import __version__

    try:
        dist = metadata.distribution("gpubake")
        requires = [r for r in dist.requires or [] if "extra ==" not in r]
        python = dist.metadata.get("Requires-Python") or ">=3.10"
        scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    except metadata.PackageNotFoundError:
        requires, python, scripts = [], ">=3.10", {}
    scripts = scripts or {"gpubake": "gpubake.cli:main", "build-image": "gpubake.cli:build_image_main"}
    lines = [
        "[build-system]",
        'requires = ["setuptools>=65"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "gpubake"',
        f"version = {json.dumps(__version__)}",
        f"requires-python = {json.dumps(python)}",
        f"dependencies = {json.dumps(sorted(requires))}",
        "",
        "[project.scripts]",
        *(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sorted(scripts.items())),
        "",
        "[tool.setuptools.packages.find]",
        'where = ["src"]',
        "",
        "[tool.setuptools.package-data]",
        'gpubake = ["**/*"]',
        "",
    ]
    return "\n".join(lines)


def _installed_files(pkg: Path) -> list[ExportFile]:
    files = [ExportFile("pyproject.toml", None, 0o644, text=_installed_pyproject())]
    for top, dirs, names in os.walk(pkg):  # symlinked directories are not entered
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            path = Path(top) / name
            if name.startswith(".") or path.suffix in (".pyc", ".pyo") or path.is_symlink() or not path.is_file():
                continue
            files.append(ExportFile(f"src/gpubake/{path.relative_to(pkg).as_posix()}", path, 0o644))
    return files


def export_files(pkg: Path | None = None) -> tuple[list[ExportFile], str, list[str]]:
    """(files of the clean export, "git" | "installed", untracked files left out).

    `pkg` is the gpubake package directory to export (default: the one imported).
    """
    pkg = pkg or package_dir()
    root = checkout_root(pkg)
    if root is not None:
        files, left_out = _git_files(root)
        if not any(f.rel == "src/gpubake/__init__.py" for f in files):
            raise WheelError(f"{root}: git tracks no src/gpubake/__init__.py")
        return files, "git", left_out
    return _installed_files(pkg), "installed", []


def _tool_versions() -> dict[str, str]:
    from importlib import metadata

    try:
        setuptools = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        raise WheelError(f"building gpubake's wheel needs setuptools in {sys.executable} (pip install setuptools)") from None
    return {"setuptools": setuptools, "python": "%d.%d" % sys.version_info[:2], "zlib": zlib.ZLIB_RUNTIME_VERSION}


def cache_key(files: list[ExportFile]) -> str:
    payload = {
        "recipe": RECIPE,
        "epoch": WHEEL_EPOCH,
        "tools": _tool_versions(),
        "files": [[f.rel, f.mode, f.digest()] for f in sorted(files, key=lambda f: f.rel)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _export(files: list[ExportFile], dest: Path) -> None:
    for f in files:
        target = dest / f.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.text is not None:
            target.write_text(f.text, encoding="utf-8")
        else:
            assert f.source is not None
            shutil.copyfile(f.source, target)
        os.chmod(target, f.mode)


def _build(files: list[ExportFile], out_dir: Path) -> Path:
    """Export `files` to a temp dir and build the wheel into `out_dir` (pip + setuptools)."""
    with tempfile.TemporaryDirectory(prefix="gpubake-wheel-") as tmp:
        src = Path(tmp) / "src-export"
        _export(files, src)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
        env.update(SOURCE_DATE_EPOCH=str(WHEEL_EPOCH), PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "-q", "-w", str(out_dir), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
        wheels = sorted(out_dir.glob("gpubake-*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise WheelError(f"building gpubake's wheel failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        return wheels[0]


def place_app_wheel(dest_dir: Path, cache_dir: Path | None = None, *, pkg: Path | None = None) -> AppWheel:
    """Build (or take from the cache) gpubake's wheel and copy it into `dest_dir`."""
    files, origin, left_out = export_files(pkg)
    key = cache_key(files)
    if cache_dir is None:
        from gpubake.images.builders.storage import cache_root

        cache_dir = cache_root() / "app-wheels"
    cached = cache_dir / key
    found = sorted(cached.glob("gpubake-*.whl")) if cached.is_dir() else []
    dest_dir.mkdir(parents=True, exist_ok=True)
    if len(found) == 1:
        wheel = found[0]
    else:
        with tempfile.TemporaryDirectory(prefix="gpubake-wheel-out-") as out:
            built = _build(files, Path(out))
            wheel = dest_dir / built.name
            shutil.copyfile(built, wheel)
            # The cache is an optimisation: a read-only or full cache never fails a render.
            with contextlib.suppress(OSError), atomic_path(cached) as tmp:
                tmp.mkdir()
                shutil.copyfile(built, tmp / built.name)
        return AppWheel(path=wheel, sha256=sha256_file(wheel), origin=origin, left_out=left_out)
    placed = dest_dir / wheel.name
    shutil.copyfile(wheel, placed)
    return AppWheel(path=placed, sha256=sha256_file(placed), origin=origin, left_out=left_out)
