"""Where API keys, base URLs and per-marketplace defaults come from.

Order: command-line flag > environment > `~/.config/gpubake/config.toml` (or the file named
by `GPUBAKE_CONFIG`) > built-in default. The config file looks like::

    [runpod]
    api_key = "..."                 # or RUNPOD_API_KEY
    registry_auth_id = "clx..."     # ID of registry credentials saved at RunPod
    cloud = "SECURE"                # SECURE | COMMUNITY

    [vastai]
    api_key = "..."                 # or VAST_API_KEY
    registry = "ghcr.io"            # private registry host; user/token from GPUBAKE_REGISTRY_USER/_PASSWORD
    min_reliability = 0.98

Base URLs are overridable (`GPUBAKE_RUNPOD_API_URL`, `GPUBAKE_VAST_API_URL`) so that the
contract tests can point the clients at a local server; `GPUBAKE_HTTP_TIMEOUT` sets the read
timeout of every API request (seconds).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from gpubake import envs
from gpubake.console import console
from gpubake.errors import GpubakeError
from gpubake.images.spec import TARGETS


@dataclass(frozen=True)
class Target:
    """Static facts about one marketplace."""

    name: str
    title: str
    key_env: str
    url_env: str  # its base URL: declared, with the public API as default, in gpubake.envs


# RunPod REST v2 (v1, https://rest.runpod.io/v1, answers 410 Gone since 2026-11-15): the
# default URLs live in gpubake.envs.
RUNPOD = Target("runpod", "RunPod", "RUNPOD_API_KEY", "GPUBAKE_RUNPOD_API_URL")
VASTAI = Target("vastai", "Vast.ai", "VAST_API_KEY", "GPUBAKE_VAST_API_URL")
BY_NAME = {t.name: t for t in (RUNPOD, VASTAI)}


def target(name: str) -> Target:
    """The marketplace named by `--target`; a one-line error for anything else."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise GpubakeError(f"--target: must be one of {', '.join(TARGETS)}, got {name!r}") from None


def config_path() -> Path:
    env = envs.raw("GPUBAKE_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpubake" / "config.toml"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The parsed config file, or {} when there is none."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise GpubakeError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GpubakeError(f"{path}: invalid TOML: {exc}") from None
    for name in TARGETS:
        if name in data and not isinstance(data[name], dict):
            raise GpubakeError(f"{path}: [{name}] must be a table")
    if any(isinstance(data.get(t), dict) and "api_key" in data[t] for t in TARGETS):
        mode = path.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            console.print(f"warning: {path} holds API keys and is readable by others (chmod 600 it)", markup=False)
    return data


def section(target_name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    config = load_config() if config is None else config
    value = config.get(target_name, {})
    return value if isinstance(value, dict) else {}


def api_key(t: Target, config: dict[str, Any] | None = None) -> str | None:
    """The API key from the environment, else from the config file."""
    env = os.environ.get(t.key_env)
    if env:
        return env.strip()
    value = section(t.name, config).get("api_key")
    if value is not None and not isinstance(value, str):
        raise GpubakeError(f"{config_path()}: {t.name}.api_key must be a string")
    return value.strip() if value else None


def key_hint(t: Target) -> str:
    return f"set {t.key_env} or api_key in [{t.name}] of {config_path()}"


def base_url(t: Target) -> str:
    return envs.value(t.url_env)


def http_backoff() -> float:
    """Backoff factor of the retrying session (seconds; `GPUBAKE_HTTP_BACKOFF`)."""
    return envs.GPUBAKE_HTTP_BACKOFF


def http_timeout() -> tuple[float, float]:
    """(connect, read) timeout of every API request; the read part from `GPUBAKE_HTTP_TIMEOUT` (seconds)."""
    from gpubake.images.marketplace.http import DEFAULT_TIMEOUT

    raw = envs.raw("GPUBAKE_HTTP_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise GpubakeError(f"GPUBAKE_HTTP_TIMEOUT: not a number: {raw!r}") from None
    if value <= 0:
        raise GpubakeError(f"GPUBAKE_HTTP_TIMEOUT: must be > 0 seconds, got {raw!r}")
    return (min(DEFAULT_TIMEOUT[0], value), value)


def make_client(t: Target, *, dry_run: bool = False, config: dict[str, Any] | None = None, extra_secrets: list[str] | None = None):
    """An `ApiClient` for the marketplace, configured from flags/env/config."""
    from gpubake.images.marketplace.http import ApiClient

    return ApiClient(
        api=t.title,
        base_url=base_url(t),
        api_key=api_key(t, config),
        key_hint=key_hint(t),
        dry_run=dry_run,
        backoff=http_backoff(),
        timeout=http_timeout(),
        extra_secrets=list(extra_secrets or []),
    )
