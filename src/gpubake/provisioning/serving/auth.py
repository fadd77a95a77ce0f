"""The service's API key: who may queue jobs on the owner's GPU.

A RunPod pod's HTTP port is public through RunPod's proxy and a Vast.ai instance's
through its public IP, so the key is required on everything but liveness. The key comes
from `$GPUBAKE_API_KEY` (set by `gpubake launch` as the instance's env), is compared in
constant time (`hmac.compare_digest`) and never logged. Without a key the service only
listens on loopback, unless the owner says `--insecure-no-auth`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gpubake import envs
from gpubake.errors import GpubakeError

if TYPE_CHECKING:  # `launch` (the build side, maybe without the serve extra) reads the key rules too
    from starlette.types import ASGIApp, Receive, Scope, Send

ENV = "GPUBAKE_API_KEY"
MIN_KEY_CHARS = 16
# Paths that need the key when one is set; /health answers everyone (with less).
PROTECTED_PREFIXES = ("/v1/", "/docs", "/openapi.json", "/redoc")
UNAUTHORIZED = f"missing or wrong API key: send 'Authorization: Bearer <key>' (the server's ${ENV})"


class AuthError(GpubakeError):
    """The key or the address it protects is unusable (one line naming the env var or flag)."""


def api_key_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """$GPUBAKE_API_KEY, checked: empty means none; a short one is refused."""
    value = (envs.raw(ENV, env) or "").strip()
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS or any(c.isspace() for c in value):
        raise AuthError(f"${ENV}: must be at least {MIN_KEY_CHARS} characters without spaces "
                        f"(got {len(value)}); `python -c 'import secrets; print(secrets.token_urlsafe(32))'` makes one")
    return value


def is_loopback(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address (127/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_exposure(host: str, key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve an open API on a non-loopback address."""
    if key is None and not insecure_no_auth and not is_loopback(host):
        raise AuthError(f"--host {host}: not a loopback address and no ${ENV} is set: anyone reaching this port "
                        f"could queue jobs on this GPU; set ${ENV}, or pass --insecure-no-auth to serve it open")


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an `Authorization` header carries `key` (always true when no key is set)."""
    if key is None:
        return True
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8"))


class RequireKey:
    """ASGI middleware: 401 `{"error"}` on protected paths without the key, before the
    body is read or validated (an anonymous caller learns nothing about the API)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if authorized(header, self.key):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": UNAUTHORIZED}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
