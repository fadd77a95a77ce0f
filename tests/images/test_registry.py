"""Registry push against a real registry on loopback (Debian's docker-registry, htpasswd)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from testutil import free_port

from gpubake.errors import RegistryError
from gpubake.images import registry as reg
from gpubake.images.builders.buildah import read_archive_manifest

pytestmark = [pytest.mark.registry]


def _env_creds(monkeypatch: pytest.MonkeyPatch, user: str, password: str) -> None:
    monkeypatch.setenv(reg.USER_ENV, user)
    monkeypatch.setenv(reg.PASSWORD_ENV, password)


def _raw_manifest(registry, ref: str) -> bytes:
    """Read a manifest back independently of gpubake (curl-free: skopeo with an auth file)."""
    auth = registry.root / "reader-auth.json"
    import base64

    token = base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
    auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    os.chmod(auth, 0o600)
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", "--authfile", str(auth), f"docker://{ref}"],
        capture_output=True,
        check=True,
    )
    auth.unlink()
    return out.stdout


def test_push_reads_manifest_back_with_the_archive_digest(registry, tiny_archive, monkeypatch, tmp_path):
    _env_creds(monkeypatch, registry.user, registry.password)
    local_digest, _ = read_archive_manifest(tiny_archive)
    ref = f"{registry.host}/gpubake/tiny:t1"
    result = reg.push(tiny_archive, ref, log_file=tmp_path / "push.log")
    assert result.ref == ref
    assert result.digest == local_digest
    raw = _raw_manifest(registry, ref)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == local_digest
    log = (tmp_path / "push.log").read_text()
    assert "skopeo copy" in log and registry.password not in log


def test_wrong_password_is_one_line_naming_registry_and_user(registry, tiny_archive, monkeypatch):
    _env_creds(monkeypatch, registry.user, "not-the-password")
    with pytest.raises(RegistryError) as info:
        reg.push(tiny_archive, f"{registry.host}/gpubake/tiny:bad")
    message = str(info.value)
    assert message == f"registry {registry.host} refused the credentials for user {registry.user}"
    assert "\n" not in message and "not-the-password" not in message


def test_no_credentials_says_how_to_give_them(registry, tiny_archive, monkeypatch, tmp_path):
    monkeypatch.delenv(reg.USER_ENV, raising=False)
    monkeypatch.delenv(reg.PASSWORD_ENV, raising=False)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "none.json"))  # not the user's real one
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RegistryError, match=r"requires credentials: set GPUBAKE_REGISTRY_USER"):
        reg.push(tiny_archive, f"{registry.host}/gpubake/tiny:anon")


def test_users_auth_file_is_used_when_env_is_empty(registry, tiny_archive, monkeypatch, tmp_path):
    import base64

    monkeypatch.delenv(reg.USER_ENV, raising=False)
    monkeypatch.delenv(reg.PASSWORD_ENV, raising=False)
    auth = tmp_path / "auth.json"
    token = base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
    auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    result = reg.push(tiny_archive, f"{registry.host}/gpubake/tiny:fromfile")
    assert result.digest == read_archive_manifest(tiny_archive)[0]


def test_unreachable_registry_is_one_line(tiny_archive, monkeypatch):
    port = free_port()  # nothing listens there
    _env_creds(monkeypatch, "u", "p4ssword")
    with pytest.raises(RegistryError) as info:
        reg.push(tiny_archive, f"127.0.0.1:{port}/gpubake/tiny:x")
    assert str(info.value) == f"registry 127.0.0.1:{port} is not reachable"


def test_password_never_in_argv_and_auth_file_is_private_and_removed(registry, tiny_archive, monkeypatch):
    _env_creds(monkeypatch, registry.user, registry.password)
    seen: list[tuple[list[str], int | None, str | None]] = []
    real_run = subprocess.run

    def spy(cmd, *args, **kwargs):
        authfile = None
        for flag in ("--dest-authfile", "--authfile"):
            if flag in cmd:
                authfile = cmd[cmd.index(flag) + 1]
        mode = stat.S_IMODE(os.stat(authfile).st_mode) if authfile else None
        seen.append((list(cmd), mode, authfile))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(reg.subprocess, "run", spy)
    reg.push(tiny_archive, f"{registry.host}/gpubake/tiny:argv")
    assert seen, "skopeo was not called"
    for cmd, mode, authfile in seen:
        assert registry.password not in " ".join(cmd)
        assert mode == 0o600
        assert not Path(authfile).exists()  # removed after the push
        assert not str(authfile).startswith(str(Path.cwd()))


def test_bad_destination_and_half_set_credentials(monkeypatch, tiny_archive):
    with pytest.raises(RegistryError, match=r"--push: 'no-registry' is not REGISTRY/NAME"):
        reg.push(tiny_archive, "no-registry")
    monkeypatch.setenv(reg.USER_ENV, "someone")
    monkeypatch.delenv(reg.PASSWORD_ENV, raising=False)
    with pytest.raises(RegistryError, match=r"GPUBAKE_REGISTRY_PASSWORD is not set"):
        reg.push(tiny_archive, "127.0.0.1:1/x/y:z")


def test_missing_archive(tmp_path):
    with pytest.raises(RegistryError, match=r"does not exist"):
        reg.push(tmp_path / "nope.oci.tar", "127.0.0.1:1/x/y:z")


def test_auth_repr_hides_password():
    assert "hunter2" not in repr(reg.RegistryAuth("u", "hunter2"))


def test_loopback_is_insecure_by_default_others_not():
    assert reg.is_loopback("127.0.0.1:5000") and reg.is_loopback("localhost:5000")
    assert not reg.is_loopback("ghcr.io") and not reg.is_loopback("10.0.0.1:5000")


def test_a_port_or_digest_containing_401_is_not_an_auth_failure():
    # Regression: a free port like 40123 made "connection refused" read as HTTP 401.
    stderr = 'pinging container registry 127.0.0.1:40123: Get "http://127.0.0.1:40123/v2/": dial tcp 127.0.0.1:40123: connect: connection refused'
    assert reg._explain(stderr, "127.0.0.1:40123", None, True) == "registry 127.0.0.1:40123 is not reachable"
    assert "refused the credentials" in reg._explain("reading manifest: unauthorized: 401", "h:5000", reg.RegistryAuth("u", "p"), True)
