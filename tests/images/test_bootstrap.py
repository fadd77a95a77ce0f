"""The bootstrap base: normalisation, reproducible packing, the OCI layout, the cache key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from gpubake.errors import BuildError
from gpubake.images import bootstrap
from gpubake.images.bootstrap import BootstrapInputs

EPOCH = 1700000000


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_rootfs(root: Path) -> None:
    """A tiny tree with the kinds of files debootstrap leaves behind."""
    for rel, text in {
        "etc/hostname": "build-host-42\n",
        "etc/resolv.conf": "nameserver 10.0.0.1\n",
        "etc/machine-id": "0123456789abcdef\n",
        "etc/shadow": "root:*:20000:0:99999:7:::\nuser:!:20001:0:99999:7:::\n",
        "etc/passwd-": "old\n",
        "etc/os-release": "ID=debian\n",
        "var/log/dpkg.log": "2026-11-24 installed things\n",
        "var/log/apt/history.log": "Start-Date: today\n",
        "var/cache/apt/pkgcache.bin": "cache",
        "var/cache/apt/archives/python3_3.11_amd64.deb": "deb",
        "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease": "lists",
        "var/lib/dpkg/status-old": "old status",
        "var/cache/ldconfig/aux-cache": "aux",
        "tmp/leftover": "x",
        "etc/ssh/ssh_host_ed25519_key": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
        "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA build-host\n",
        "etc/ssh/sshd_config": "PermitRootLogin prohibit-password\n",
        "usr/bin/tool": "#!/bin/sh\n",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "dev").mkdir()
    os.symlink("usr/bin", root / "bin")


def test_normalise_drops_host_and_time_records(tmp_path):
    root = tmp_path / "rootfs"
    _fake_rootfs(root)
    bootstrap.normalise_rootfs(root, EPOCH)
    assert (root / "etc/hostname").read_bytes() == b""
    assert (root / "etc/resolv.conf").read_bytes() == b""
    for gone in ("etc/machine-id", "etc/passwd-", "var/lib/dpkg/status-old", "var/cache/ldconfig/aux-cache", "tmp/leftover",
                 "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub"):
        assert not (root / gone).exists(), gone
    assert (root / "etc/ssh/sshd_config").exists()  # configuration stays; only per-instance keys go
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))
    assert not (root / "var/cache/apt/pkgcache.bin").exists()
    assert [p.name for p in (root / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert (root / "var/log/dpkg.log").read_bytes() == b"" and (root / "var/log/apt/history.log").read_bytes() == b""
    day = str(EPOCH // 86400)
    assert [line.split(":")[2] for line in (root / "etc/shadow").read_text().splitlines()] == [day, day]
    assert (root / "etc/os-release").read_text() == "ID=debian\n"  # content is kept


def test_pack_is_byte_reproducible_whatever_the_mtimes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_rootfs(a)
    shutil.copytree(a, b, symlinks=True)
    os.utime(b / "usr/bin/tool", (EPOCH + 10_000, EPOCH + 10_000))  # "installed later"
    os.utime(a / "usr/bin/tool", (EPOCH + 99_999, EPOCH + 99_999))
    bootstrap.pack_rootfs(a, tmp_path / "a.tar", EPOCH)
    bootstrap.pack_rootfs(b, tmp_path / "b.tar", EPOCH)
    assert _sha(tmp_path / "a.tar") == _sha(tmp_path / "b.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        assert names == sorted(names, key=lambda n: n.split("/"))  # sorted, parent before child
        assert all(m.mtime <= EPOCH for m in tar.getmembers())
        assert not any(n.startswith("./") or n.startswith("/") for n in names)
        assert tar.getmember("bin").issym()


def test_pack_keeps_old_mtimes_so_pyc_stay_valid(tmp_path):
    root = tmp_path / "r"
    (root / "usr").mkdir(parents=True)
    (root / "usr/old.py").write_text("x = 1\n")
    os.utime(root / "usr/old.py", (EPOCH - 5000, EPOCH - 5000))
    bootstrap.pack_rootfs(root, tmp_path / "r.tar", EPOCH)
    with tarfile.open(tmp_path / "r.tar") as tar:
        assert tar.getmember("usr/old.py").mtime == EPOCH - 5000


def test_oci_layout_is_valid_and_deterministic(tmp_path):
    if not shutil.which("skopeo"):
        pytest.skip("skopeo not installed")
    inputs = BootstrapInputs("bookworm", ("python3",), EPOCH, arch="amd64")
    digests = []
    for name in ("one", "two"):
        root = tmp_path / f"root-{name}"
        _fake_rootfs(root)
        layer = tmp_path / f"{name}.tar"
        bootstrap.pack_rootfs(root, layer, EPOCH)
        layout = tmp_path / f"layout-{name}"
        layout.mkdir()
        digests.append(bootstrap.write_oci_layout(layout, layer, inputs))
    assert digests[0] == digests[1]
    out = subprocess.run(["skopeo", "inspect", "--config", f"oci:{tmp_path / 'layout-one'}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert len(config["rootfs"]["diff_ids"]) == 1


def test_key_depends_on_every_input_but_not_package_order():
    base = BootstrapInputs("bookworm", ("python3", "ca-certificates"), EPOCH, arch="amd64")
    same = BootstrapInputs("bookworm", ("ca-certificates", "python3", "python3"), EPOCH, arch="amd64")
    assert base.key() == same.key() and base.ref() == same.ref()
    others = [
        BootstrapInputs("trixie", ("python3", "ca-certificates"), EPOCH, arch="amd64"),
        BootstrapInputs("bookworm", ("python3",), EPOCH, arch="amd64"),
        BootstrapInputs("bookworm", ("python3", "ca-certificates"), EPOCH + 1, arch="amd64"),
        BootstrapInputs("bookworm", ("python3", "ca-certificates"), EPOCH, mirror="http://m/debian", arch="amd64"),
        BootstrapInputs("bookworm", ("python3", "ca-certificates"), EPOCH, arch="arm64"),
    ]
    assert len({base.key(), *(o.key() for o in others)}) == 1 + len(others)
    assert base.ref().startswith("localhost/gpubake/bootstrap-bookworm:")


def test_missing_debootstrap_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(BuildError, match=r"^bootstrap base: debootstrap is not installed"):
        bootstrap.build_layout(BootstrapInputs("bookworm", (), EPOCH), log_file=tmp_path / "log")
    assert not (tmp_path / "cache" / "bootstrap").exists() or not any((tmp_path / "cache" / "bootstrap").rglob("index.json"))


def test_unknown_suite_fails_with_log_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("needs root and debootstrap")
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "boot.log"
    with pytest.raises(BuildError) as info:
        bootstrap.build_layout(BootstrapInputs("nosuchsuite", (), EPOCH), log_file=log)
    assert "bootstrap base (nosuchsuite) failed" in str(info.value) and str(log) in str(info.value)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").rglob("index.json"))
