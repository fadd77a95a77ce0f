"""Keep secrets out of logs, dry-run output, exceptions and rendered files.

Secrets come from the environment (or a user's auth/config file) at the moment they
are needed and are passed to subprocesses through their environment or stdin, never
through argv (visible in `ps`) or files inside a build context.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from urllib.parse import unquote

from gpubake import envs

# Environment variables whose values are always treated as secret: gpubake's own (declared
# secret in gpubake.envs) and other tools'.
_OTHER_SECRET_ENV_VARS = (
    "REGISTRY_PASSWORD",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RUNPOD_API_KEY",
    "VAST_API_KEY",
    "GPUBAKE_API_KEY",  # the generation service's key (provisioning.serving.auth)
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
SECRET_ENV_VARS = (*envs.secret_names(), *_OTHER_SECRET_ENV_VARS)

REDACTED = "***"
_SECRET_NAME = re.compile(r"(password|passwd|secret|token|api[_-]?key|authorization)", re.I)


def known_secrets(extra: Iterable[str] = ()) -> list[str]:
    """Secret values currently in the environment, plus `extra`, longest first."""
    values = [envs.raw(name) or "" for name in envs.secret_names()]
    values += [os.environ.get(name, "") for name in _OTHER_SECRET_ENV_VARS]
    values.extend(extra)
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """Replace every known secret value in `text` with ***, and the credentials of every URL in it."""
    for value in known_secrets(extra):
        text = text.replace(value, REDACTED)
    return redact_urls(text)


# Query parameters that carry credentials: presigned S3/GCS/Azure URLs, API tokens.
SECRET_QUERY_KEYS = frozenset(
    k.lower()
    for k in (
        "token", "access_token", "auth", "key", "api_key", "apikey", "signature", "sig", "password",
        "secret", "client_secret", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
        "X-Goog-Signature", "X-Goog-Credential",
    )
)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def _secret_query_key(key: str) -> bool:
    return key.lower() in SECRET_QUERY_KEYS or is_secret_name(key)


def redact_url(url: str) -> str:
    """`url` without its credentials: userinfo becomes ***, token-like query values ***.

    `https://user:TOKEN@host/p?token=abc&rev=main` -> `https://***@host/p?token=***&rev=main`.
    Everything else is kept byte for byte (no re-encoding).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = len(rest)
    for ch in "/?#":
        pos = rest.find(ch)
        if pos != -1:
            cut = min(cut, pos)
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rsplit('@', 1)[1]}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hashmark, fragment = query.partition("#")
        pairs = []
        for pair in re.split(r"([&;])", query):
            key, eq, _value = pair.partition("=")
            pairs.append(f"{key}={REDACTED}" if eq and _secret_query_key(unquote(key)) else pair)
        tail = path + "?" + "".join(pairs) + hashmark + fragment
    return f"{scheme}://{authority}{tail}"


def redact_urls(text: str) -> str:
    """Every URL inside `text` passed through `redact_url` (error lines, log lines)."""

    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        trail = len(url) - len(url.rstrip(".,:;!?)]}"))
        return redact_url(url[: len(url) - trail]) + url[len(url) - trail :]

    return _URL.sub(one, text)


def is_secret_name(name: str) -> bool:
    """True for header/env/field names that hold secrets (Authorization, *_TOKEN ...)."""
    return bool(_SECRET_NAME.search(name))


class RedactingFilter(logging.Filter):
    """Logging filter that scrubs secret values from every record it passes."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self._extra = list(extra)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self._extra)
        record.args = None
        return True
