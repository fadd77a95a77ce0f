"""Every pinned file of every shipped lock has a source a fresh machine would use, and where
this machine holds a copy (a local wheel folder or a file:// index in pip's configuration, as
on this project's CI), the lock's hash is that file's.

The real indexes (PyPI, download.pytorch.org) are not reached from tests; what is checked
here is the configuration: the lock alone names an index for each pin, local-version pins
(`+cpu`: PyPI refuses local versions) come from an extra index of PyTorch for that build,
and the host's copies agree with the hashes."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from gpubake.images import catalog
from gpubake.images.builders import wheels

LOCKS = sorted({spec.lock_path for spec in catalog.all_specs()})
PYPI = "https://pypi.org/simple"


def _lock(path: Path) -> wheels.LockSources:
    return wheels.parse_lock(path.read_text(encoding="utf-8"))


def _hashes(entry: str) -> set[str]:
    return set(re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_the_lock_alone_names_a_source_for_every_pin(lock: Path):
    sources = _lock(lock)
    assert sources.index_url == PYPI  # a fresh machine's pip has no other configuration
    assert not sources.find_links  # no path of this machine
    assert len(sources.entries) == len(sources.pins()) > 10
    for entry in sources.entries:
        assert _hashes(entry), entry.split()[0]
        name, version = wheels._PIN.match(entry).group("name", "version")
        if "+" in version:  # a PyTorch build: from PyTorch's index for that build
            local = version.split("+", 1)[1]
            assert f"https://download.pytorch.org/whl/{local}" in sources.source_of(entry), entry.split()[0]
        else:
            assert sources.source_of(entry)[0] == PYPI


def test_the_demo_torch_is_the_cpu_build_from_pytorchs_index():
    sources = _lock(catalog.find("demo").lock_path)
    assert ("torch", "2.13.0+cpu") in sources.pins()
    assert sources.extra_index_urls == ["https://download.pytorch.org/whl/cpu"]
    gpu = _lock(catalog.find("wan22-t2v-a14b-nvfp4-hopper").lock_path)
    assert not gpu.extra_index_urls and not [e for e in gpu.entries if gpu.is_local(e)]  # all of it from PyPI
    assert {"torch", "triton", "fa3-fwd"} <= {name for name, _ in gpu.pins()}


def test_split_keeps_every_pin_once_and_the_extra_index_only_where_needed():
    sources = _lock(catalog.find("demo").lock_path)
    local, public = sources.split()
    a, b = wheels.parse_lock(local), wheels.parse_lock(public)
    assert [e.split()[0] for e in a.entries] == ["torch==2.13.0+cpu"]
    assert a.extra_index_urls == sources.extra_index_urls and a.index_url == PYPI
    assert not b.extra_index_urls and b.index_url == PYPI
    assert sorted(a.entries + b.entries) == sorted(sources.entries)
    assert _lock(catalog.find("wan22-ti2v-5b").lock_path).split() is None  # nothing to split


def _pip_config() -> dict[str, list[str]]:
    """find-links and extra-index-url of this machine's pip configuration (files and env)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf: dict[str, list[str]] = {"find-links": [], "extra-index-url": [], "index-url": []}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in conf:
            conf[option] += value.strip().strip("'\"").split()
    for env, option in (("PIP_FIND_LINKS", "find-links"), ("PIP_EXTRA_INDEX_URL", "extra-index-url")):
        conf[option] += os.environ.get(env, "").split()
    return conf


def _local_copies() -> list[tuple[str, Path, str | None]]:
    """(file name, path, sha256 the index page advertises or None) of every wheel this machine's
    pip configuration points at on its own disk."""
    conf = _pip_config()
    found: list[tuple[str, Path, str | None]] = []
    for link in conf["find-links"]:
        folder = Path(urllib.parse.urlparse(link).path if link.startswith("file:") else link)
        if folder.is_dir():
            found += [(p.name, p, None) for p in folder.glob("*.whl")]
    for index in conf["extra-index-url"] + conf["index-url"]:
        if not index.startswith("file://"):
            continue
        root = Path(urllib.parse.urlparse(index).path)
        for page in root.glob("*/index.html"):
            for href, digest in re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"', page.read_text(errors="replace")):
                path = (page.parent / urllib.parse.unquote(href)).resolve()
                found.append((path.name, path, digest))
    return sorted(set(found), key=lambda c: str(c[1]))  # pip config lists a folder once per scope


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_local_copies_of_pinned_files_have_the_locks_hashes(lock: Path):
    from packaging.utils import canonicalize_name, parse_wheel_filename

    sources = _lock(lock)
    pinned = {}
    for entry in sources.entries:
        name, version = wheels._PIN.match(entry).group("name", "version")
        pinned[(canonicalize_name(name), version)] = _hashes(entry)
    copies = [c for c in _local_copies() if c[0].endswith(".whl")]
    checked = 0
    for filename, path, advertised in copies:
        name, version, _, _ = parse_wheel_filename(filename)
        want = pinned.get((canonicalize_name(name), str(version)))
        if want is None:
            continue  # another release than the lock's
        digest = advertised
        if digest is None or path.stat().st_size < 50_000_000:  # hash the file itself (big ones: the index's word)
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if advertised is not None:
                assert digest == advertised, f"{path}: the index page's sha256 is not the file's"
        assert digest in want, f"{filename}: this machine's copy ({path}) is not a file {lock.name} pins"
        checked += 1
    if not checked:
        pytest.skip(f"no local copy of a file {lock.name} pins (a fresh machine: every file comes from the named indexes)")
