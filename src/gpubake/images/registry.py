"""Push an image to a registry with skopeo and prove it arrived intact.

Why skopeo: it copies OCI archives and containers-storage images to any registry without
a daemon, keeps blobs byte-for-byte (`--preserve-digests`), and reads a manifest back.

Credentials: `GPUBAKE_REGISTRY_USER` / `GPUBAKE_REGISTRY_PASSWORD` when set, else what
skopeo finds itself in the user's auth file (`REGISTRY_AUTH_FILE`,
`~/.config/containers/auth.json`, `~/.docker/config.json`). Environment credentials reach
skopeo through a temporary auth file (mode 0600, in a private temp dir outside any build
context, deleted after use): never argv, never a log (logs are redacted as well).

After the copy, the manifest is read back from the registry (`skopeo inspect --raw`) and
its sha256 compared with the digest skopeo pushed and, for an archive, the archive's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpubake import envs
from gpubake.errors import RegistryError
from gpubake.secrets import redact

USER_ENV = "GPUBAKE_REGISTRY_USER"
PASSWORD_ENV = "GPUBAKE_REGISTRY_PASSWORD"

_REF = re.compile(r"^(?P<host>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?$")


@dataclass(frozen=True)
class RegistryAuth:
    """A username and password for one push (the password is never printed)."""

    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of tracebacks and debug output
        return f"RegistryAuth(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class PushResult:
    ref: str
    digest: str

    def to_json(self) -> dict:
        return {"ref": self.ref, "digest": self.digest}


def auth_from_env(env: dict[str, str] | None = None) -> RegistryAuth | None:
    """Credentials from GPUBAKE_REGISTRY_USER/PASSWORD; None when neither is set."""
    env = os.environ if env is None else env
    user, password = envs.raw(USER_ENV, env) or "", envs.raw(PASSWORD_ENV, env) or ""
    if not user and not password:
        return None
    if not user or not password:
        missing = USER_ENV if not user else PASSWORD_ENV
        raise RegistryError(f"{missing} is not set (set both {USER_ENV} and {PASSWORD_ENV}, or neither)")
    return RegistryAuth(user, password)


def resolve_auth(dest_ref: str | None = None) -> RegistryAuth | None:
    """Credentials for a push: the environment's, else None (skopeo then reads the user's
    auth file: REGISTRY_AUTH_FILE, ~/.config/containers/auth.json, ~/.docker/config.json)."""
    return auth_from_env()


def registry_host(dest_ref: str) -> str:
    """`host[:port]` of a `REGISTRY/NAME[:TAG]` reference; one-line error otherwise."""
    ref = dest_ref.removeprefix("docker://")
    match = _REF.match(ref)
    if not match or ("." not in match["host"] and ":" not in match["host"] and match["host"] != "localhost"):
        raise RegistryError(f"--push: {dest_ref!r} is not REGISTRY/NAME[:TAG] (e.g. ghcr.io/me/demo:runpod)")
    return match["host"]


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0][1:]
    return name in ("localhost", "::1") or name.startswith("127.")


@contextmanager
def _auth_file(host: str, auth: RegistryAuth | None) -> Iterator[Path | None]:
    """A 0600 auth file for `host` in a private temp dir (removed on exit), or None."""
    if auth is None:
        yield None
        return
    tmpdir = Path(tempfile.mkdtemp(prefix="gpubake-auth."))  # 0700, outside any context
    path = tmpdir / "auth.json"
    try:
        token = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"auths": {host: {"auth": token}}}, fh)
        yield path
    finally:
        path.unlink(missing_ok=True)
        tmpdir.rmdir()


_TRANSPORTS = ("oci-archive:", "oci:", "containers-storage:", "docker-archive:", "dir:", "docker://")


def _source_ref(local_ref_or_archive: str | os.PathLike[str], storage=None) -> str:
    """A skopeo source: a transport-qualified ref as is, a .tar/file as oci-archive, else local storage."""
    text = str(local_ref_or_archive)
    if text.startswith(_TRANSPORTS):
        return text
    path = Path(text)
    if path.suffix == ".tar" or path.is_file():
        if not path.is_file():
            raise RegistryError(f"push: {path} does not exist (build it first)")
        return f"oci-archive:{path}"
    from gpubake.images.builders.storage import default_storage

    return (storage or default_storage()).ref(text)


def _explain(stderr: str, host: str, auth: RegistryAuth | None, insecure: bool) -> str:
    """One line saying why skopeo failed, in the user's terms."""
    low = stderr.lower()
    # A bare "401" would also match a port (127.0.0.1:40123) or a digest: whole word only.
    if "unauthorized" in low or "authentication required" in low or re.search(r"\b401\b", low) or "denied" in low:
        if auth is not None:
            return f"registry {host} refused the credentials for user {auth.username}"
        return f"registry {host} requires credentials: set {USER_ENV} and {PASSWORD_ENV}, or log in with `skopeo login {host}`"
    if "http response to https client" in low or ("tls" in low and "handshake" in low):
        hint = "" if insecure else "; pass --insecure-registry for a plain-HTTP registry"
        return f"registry {host}: TLS failed{hint}"
    if "connection refused" in low or "no such host" in low or "i/o timeout" in low or "network is unreachable" in low:
        return f"registry {host} is not reachable"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"registry {host}: {redact(last[-1].strip())[:300] if last else 'skopeo failed'}"


def _skopeo(args: list[str], *, log_file: Path | None, auth: RegistryAuth | None) -> subprocess.CompletedProcess[bytes]:
    """Run skopeo (bytes out: a manifest must be hashed exactly as served); log redacted."""
    extra = [auth.password] if auth else []
    try:
        proc = subprocess.run(["skopeo", *args], capture_output=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RegistryError("skopeo is not installed (apt-get install skopeo, or run scripts/setup.sh)") from None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a", encoding="utf-8") as log:
            log.write(redact("$ skopeo " + " ".join(args), extra) + "\n")
            if args[0] != "inspect":
                log.write(redact(proc.stdout.decode(errors="replace"), extra))
            log.write(redact(proc.stderr.decode(errors="replace"), extra))
            log.write(f"# exit {proc.returncode}\n")
    return proc


def push(
    local_ref_or_archive: str | os.PathLike[str],
    dest_ref: str,
    *,
    auth: RegistryAuth | None = None,
    insecure: bool | None = None,
    log_file: Path | None = None,
    storage=None,
) -> PushResult:
    """Copy an OCI archive (or a local image) to `dest_ref`, verify the manifest, return its digest.

    `auth`: explicit credentials; None means environment credentials if set, else the
    user's auth file. `insecure`: plain HTTP / unverified TLS (`--insecure-registry`);
    None means only for loopback hosts (127.0.0.0/8, localhost, ::1), as Docker does.
    """
    host = registry_host(dest_ref)
    if insecure is None:
        insecure = is_loopback(host)
    dest = "docker://" + dest_ref.removeprefix("docker://")
    if auth is None:
        auth = auth_from_env()
    src = _source_ref(local_ref_or_archive, storage)
    tls = f"--dest-tls-verify={'false' if insecure else 'true'}"
    with _auth_file(host, auth) as authfile, tempfile.TemporaryDirectory(prefix="gpubake-push.") as tmp:
        digest_file = Path(tmp) / "digest"
        args = ["copy", "--quiet", "--preserve-digests", tls, "--digestfile", str(digest_file)]
        if authfile is not None:
            args += ["--dest-authfile", str(authfile)]
        proc = _skopeo([*args, src, dest], log_file=log_file, auth=auth)
        if proc.returncode != 0:
            raise RegistryError(_explain(proc.stderr.decode(errors="replace"), host, auth, insecure))
        pushed = digest_file.read_text().strip()
        inspect = ["inspect", "--raw", f"--tls-verify={'false' if insecure else 'true'}"]
        if authfile is not None:
            inspect += ["--authfile", str(authfile)]
        back = _skopeo([*inspect, dest], log_file=log_file, auth=auth)
        if back.returncode != 0:
            raise RegistryError(_explain(back.stderr.decode(errors="replace"), host, auth, insecure))
    remote = "sha256:" + hashlib.sha256(back.stdout).hexdigest()
    if remote != pushed:
        raise RegistryError(f"registry {host}: manifest read back is {remote}, pushed {pushed}")
    if src.startswith("oci-archive:"):
        from gpubake.images.builders.buildah import read_archive_manifest

        local, _ = read_archive_manifest(Path(src.removeprefix("oci-archive:")))
        if local != remote:
            raise RegistryError(f"registry {host}: manifest {remote} differs from the archive's {local}")
    return PushResult(ref=dest_ref.removeprefix("docker://"), digest=remote)
