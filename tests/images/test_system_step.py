"""Build step 10 (`provisioning/build/10-system.sh`): which system packages it installs.

The step runs for real, in a throwaway root: a user and mount namespace (`unshare`) where
the host's /usr is bound read-only and everything else (/etc, /var, /root, /tmp) is a
temporary directory, then `chroot`. `apt-get` and the image's Python are stubs on PATH
that record their arguments; `sshd` is a stub when the base "has" one. So the step's
removals (`scrub`, the apt lists) touch only that root.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

BUILD = Path(__file__).resolve().parents[2] / "src" / "gpubake" / "provisioning" / "build"
PY = "3.99"  # a Python version no host has: the image's python3.99 is a stub or absent


def _userns_ok() -> bool:
    if not shutil.which("unshare") or not shutil.which("chroot"):
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _userns_ok(), reason="needs unshare with user and mount namespaces")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def run_step(tmp: Path, *, python: bool, certs: bool, sshd: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    root = tmp / "root"
    for d in ("usr", "etc/ssl/certs", "etc/ssh", "var/log", "var/lib/apt/lists", "var/lib/dpkg", "var/cache", "root",
              "tmp", "var/tmp", "stub", "build", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        if Path("/" + link).is_symlink():
            (root / link).symlink_to(target)
    for script in ("00-env.sh", "10-system.sh"):
        shutil.copy(BUILD / script, root / "build" / script)
    (root / "var/lib/apt/lists/lists-of-the-base").write_text("x")
    _stub(root / "stub/apt-get", 'echo "apt-get $*" >> /apt.log\n')
    if python:
        _stub(root / f"stub/python{PY}", "exit 0\n")  # `-c 'import ensurepip, venv, ssl'` succeeds
    if sshd:
        _stub(root / "stub/sshd", "exit 0\n")
    if certs:
        (root / "etc/ssl/certs/ca-certificates.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (root / "dev/null").touch()
    inner = (f'mount --bind /usr "{root}/usr" && mount -o remount,bind,ro "{root}/usr" && '
             f'mount --bind /dev/null "{root}/dev/null" && '
             f'exec chroot "{root}" /usr/bin/env -i PATH=/stub:/usr/bin:/bin GPUBAKE_PYTHON={PY} /bin/sh /build/10-system.sh')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--fork", "/bin/sh", "-c", inner],
                          capture_output=True, text=True, timeout=60)
    log = root / "apt.log"
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_a_base_with_python_but_no_sshd_gets_openssh_server(tmp_path):
    proc, apt = run_step(tmp_path, python=True, certs=True, sshd=False)
    assert proc.returncode == 0, proc.stderr
    assert apt == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends openssh-server", "apt-get clean"]
    assert not (tmp_path / "root/var/lib/apt/lists/lists-of-the-base").exists()  # the layer keeps no apt lists


def test_a_base_with_python_and_sshd_installs_nothing(tmp_path):
    proc, apt = run_step(tmp_path, python=True, certs=True, sshd=True)
    assert proc.returncode == 0, proc.stderr
    assert apt == [] and "and sshd, present; no system packages to add" in proc.stdout


def test_a_bare_base_gets_python_certificates_and_openssh_server(tmp_path):
    proc, apt = run_step(tmp_path, python=False, certs=False, sshd=False)
    assert proc.returncode == 0, proc.stderr
    assert apt[1] == f"apt-get install -y -qq --no-install-recommends python{PY} python{PY}-venv python{PY}-dev ca-certificates gcc libc6-dev openssh-server"


def test_a_base_with_sshd_but_no_certificates_gets_no_second_sshd(tmp_path):
    proc, apt = run_step(tmp_path, python=True, certs=False, sshd=True)
    assert proc.returncode == 0, proc.stderr
    assert apt[1] == f"apt-get install -y -qq --no-install-recommends python{PY} python{PY}-venv python{PY}-dev ca-certificates gcc libc6-dev"
