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
    """Replace every known secret value in `text` with ***."""
    for value in known_secrets(extra):
        text = text.replace(value, REDACTED)
    return text


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
