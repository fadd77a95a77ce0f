"""Bare GPU hosts over SSH (fabric): run the self-test, fetch its report; the transport.

For users who rent machines rather than marketplace templates (`provision.py` installs an
image's stack with it). Everything goes over one SSH connection (fabric/paramiko): files
by SFTP, commands through the remote shell with every argument quoted. Host keys are checked against known_hosts and an unknown host is
refused unless `--accept-new-host-key` (then it is remembered, as OpenSSH's
`StrictHostKeyChecking=accept-new` does); fabric's own default would trust any key.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpubake.console import console
from gpubake.errors import GpubakeError
from gpubake.fsutil import atomic_path
from gpubake.secrets import redact
from gpubake.smoke_tests.report import IN_PROGRESS, Report, ReportError

_DEST = re.compile(r"^(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@(?P<host>[A-Za-z0-9._:-]+|\[[0-9A-Fa-f:]+\])$")
REMOTE_DIR = ".gpubake"  # under the remote user's home; SFTP paths are relative to it


class RemoteError(GpubakeError):
    """The host could not be reached, refused us, or a remote step failed."""


def rquote(path: str) -> str:
    """Quote a remote path for the shell, keeping a leading `~/` as the remote $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


@dataclass(frozen=True)
class SshTarget:
    """USER@HOST[:port] with the key and host-key policy to use."""

    user: str
    host: str
    port: int = 22
    key: Path | None = None
    known_hosts: Path | None = None
    accept_new: bool = False

    @classmethod
    def parse(cls, dest: str, *, port: int = 22, key: Path | None = None, known_hosts: Path | None = None,
              accept_new: bool = False) -> SshTarget:
        match = _DEST.match(dest.strip())
        if not match:
            raise RemoteError(f"USER@HOST: expected user@host, got {dest!r}")
        if not 1 <= port <= 65535:
            raise RemoteError(f"--port: must be 1..65535, got {port}")
        if key is not None and not Path(key).is_file():
            raise RemoteError(f"--key: no such file: {key}")
        if known_hosts is not None and not accept_new and not Path(known_hosts).is_file():
            raise RemoteError(f"--known-hosts: no such file: {known_hosts}")
        return cls(match["user"], match["host"].strip("[]"), port, key, known_hosts, accept_new)

    @property
    def display(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")

    def connect(self):  # -> fabric.Connection
        """Open (lazily) a fabric Connection with our host-key policy."""
        from fabric import Config, Connection
        from paramiko import AutoAddPolicy, RejectPolicy

        kwargs: dict[str, Any] = {"banner_timeout": 15, "auth_timeout": 15}
        if self.key is not None:
            kwargs.update(key_filename=str(self.key), look_for_keys=False, allow_agent=False)
        config = Config(overrides={"load_ssh_configs": False})
        conn = Connection(self.host, user=self.user, port=self.port, connect_kwargs=kwargs, connect_timeout=15, config=config)
        client = conn.client
        client._host_keys.clear()  # only the files we name below are trusted
        client._system_host_keys.clear()
        known = self.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if self.accept_new:
            known.parent.mkdir(parents=True, exist_ok=True)
            known.touch(mode=0o600, exist_ok=True)
            client.load_host_keys(str(known))  # AutoAddPolicy saves new keys here
            client.set_missing_host_key_policy(AutoAddPolicy())
        else:
            if known.is_file():
                client.load_host_keys(str(known))
            client.set_missing_host_key_policy(RejectPolicy())
        return conn


def _ssh_error(target: SshTarget, exc: BaseException) -> RemoteError:
    """One line for whatever paramiko/socket raised while connecting."""
    import paramiko

    where = target.display
    if isinstance(exc, paramiko.BadHostKeyException):
        return RemoteError(f"{where}: host key CHANGED (known_hosts has a different key); refusing to connect")
    if isinstance(exc, paramiko.AuthenticationException):
        how = f"key {target.key}" if target.key else "your SSH agent / ~/.ssh keys"
        return RemoteError(f"{where}: SSH authentication failed with {how}")
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return RemoteError(f"{where}: unknown host key; add it to known_hosts or pass --accept-new-host-key")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return RemoteError(f"{where}: SSH connection timed out")
    if isinstance(exc, (OSError, paramiko.ssh_exception.NoValidConnectionsError)):
        return RemoteError(f"{where}: cannot connect ({exc.__class__.__name__}: {exc.strerror or exc})")
    return RemoteError(f"{where}: SSH error: {redact(' '.join(str(exc).split()))[:200]}")


class Session:
    """An open connection to the host, with the few operations gpubake needs."""

    def __init__(self, target: SshTarget) -> None:
        import paramiko

        self.target = target
        self.conn = target.connect()
        try:
            self.conn.open()
        except (paramiko.SSHException, OSError) as exc:
            raise _ssh_error(target, exc) from None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def run(self, command: str, *, timeout: float | None = 600, what: str = "") -> Any:
        """Run a shell command; returns fabric's Result (never raises on exit status)."""
        import invoke

        try:
            return self.conn.run(command, warn=True, hide=True, in_stream=False, timeout=timeout)
        except invoke.exceptions.CommandTimedOut:
            raise RemoteError(f"{self.target.display}: {what or 'remote command'} timed out after {timeout:.0f} s") from None

    def check(self, command: str, *, what: str, timeout: float | None = 600) -> str:
        """Run and require exit 0; the error names the step and the last line of its output."""
        result = self.run(command, timeout=timeout, what=what)
        if result.exited != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            raise RemoteError(f"{self.target.display}: {what} failed (exit {result.exited}): {redact(tail[0])[:200]}")
        return result.stdout

    def put(self, local: Path, remote: str) -> None:
        try:
            self.conn.put(str(local), remote=remote)
        except OSError as exc:
            raise RemoteError(f"{self.target.display}: upload of {local.name} failed: {exc}") from None

    def get(self, remote: str, local: Path) -> None:
        """Fetch a file; the local copy appears only when complete (atomic)."""
        try:
            with atomic_path(local) as tmp:
                self.conn.get(remote, local=str(tmp))
        except FileNotFoundError:
            raise RemoteError(f"{self.target.display}: {remote} not found on the host") from None
        except OSError as exc:
            raise RemoteError(f"{self.target.display}: download of {remote} failed: {exc}") from None


# ------------------------------------------------------------------ selftest


def selftest(target: SshTarget, *, gpubake: str = "~/.gpubake/venv/bin/gpubake", local_report: Path,
             quick: bool = False, image: str | None = None, model_dir: str | None = None,
             facts: str | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """Run `gpubake selftest` on the host, fetch the report to `local_report`, return the outcome.

    `image` / `facts` / `model_dir` are passed to the remote self-test (a bare host has no
    image.json, GPUBAKE_IMAGE or GPUBAKE_MODEL_DIR set by an image's start script).
    """
    stamp = f"{int(time.time())}-{os.getpid()}"
    remote_report = f"{REMOTE_DIR}/selftest-{stamp}.json"
    cmd = f"{rquote(gpubake)} selftest --json --report {rquote('~/' + remote_report)}" + (" --quick" if quick else "")
    if facts:
        cmd += f" --facts {rquote(facts)}"
    if image:
        cmd += f" --image {shlex.quote(image)}"
    if model_dir:
        cmd += f" --model-dir {rquote(model_dir)}"
    with Session(target) as s:
        s.check(f"mkdir -p {rquote('~/' + REMOTE_DIR)}", what="mkdir")
        console.print(f"running the self-test on {target.display}", markup=False)
        started = time.monotonic()
        result = s.run(cmd, timeout=timeout, what="self-test")
        if result.exited == 127:
            raise RemoteError(f"{target.display}: {gpubake} not found; run `gpubake remote provision {target.user}@{target.host} --image NAME` first")
        try:
            s.get(remote_report, local_report)
        except RemoteError:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            raise RemoteError(
                f"{target.display}: the self-test wrote no report (exit {result.exited}): {redact(tail[0])[:200]}"
            ) from None
        s.run(f"rm -f {rquote('~/' + remote_report)}", what="cleanup")
    try:
        report = Report.read(local_report)
    except ReportError as exc:
        raise RemoteError(f"the fetched report: {exc}") from None
    verdict = report.outcome
    return {
        "host": target.display,
        "verdict": verdict if verdict != IN_PROGRESS else "fail",
        "exit_code": result.exited,
        "report_path": str(local_report),
        "summary": report.summary(),
        "throughput": report.throughput(),
        "seconds": round(time.monotonic() - started, 2),
    }


def read_report(target: SshTarget, path: str) -> Report | None:
    """The self-test report at `path` on the host, or None while it is not written yet.

    Connection errors propagate as `RemoteError` (the caller decides whether "not up yet"
    or fatal); a file that is not a report is a `ReportError` naming `path`.
    """
    with tempfile.TemporaryDirectory(prefix="gpubake-report-") as tmp:
        local = Path(tmp) / "selftest.json"
        with Session(target) as s:
            try:
                s.get(path, local)
            except RemoteError:
                return None
        return Report.read(local, where=f"{target.display}:{path}")


# ------------------------------------------------------------------ provision


def build_wheel(dest: Path) -> Path:
    """gpubake's wheel for the host, built as the image's is (`images.app_wheel`: the
    repository's tracked files only, no dotfile or stray credential; cached by content)."""
    from gpubake.images.app_wheel import place_app_wheel

    console.print("building the gpubake wheel", markup=False)
    return place_app_wheel(dest).path


