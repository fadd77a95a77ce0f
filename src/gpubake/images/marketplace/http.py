"""One HTTP client for the marketplace APIs: retries, timeouts, dry-run, no leaked keys.

Why a class of our own around `requests`: both marketplaces need the same four things and
`requests` alone gives none of them:
- retries with exponential backoff on 429 and 5xx (urllib3 `Retry`, honouring
  `Retry-After`, capped at `MAX_RETRY_AFTER`); a POST (which creates something) is retried
  on 429 only, because a 5xx after a create may mean it was created: a write that ends
  that way (5xx, read timeout, connection lost after sending) is an `AmbiguousError`, so the
  caller looks the object up instead of guessing;
- a timeout on every request (connect, read);
- `--dry-run`: mutating requests are recorded (method, URL, JSON body, headers) with every
  secret replaced by `***` instead of being sent;
- errors as one-line `MarketplaceError`s that name the API, method and path, and never
  carry the API key (redacted from every message).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gpubake.errors import GpubakeError
from gpubake.secrets import REDACTED, is_secret_name, redact

log = logging.getLogger("gpubake.marketplace")

RETRY_STATUSES = (429, 500, 502, 503, 504)
DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After (an hour window) is not slept through
# urllib3's names for "the request never left": nothing can have been created.
_NOT_SENT = ("NewConnectionError", "ConnectTimeoutError", "NameResolutionError", "ConnectionRefusedError")


class MarketplaceError(GpubakeError):
    """A marketplace API refused a request, or could not be reached.

    `status` is the HTTP status (None when there was no answer); `uncertain` is True when
    the request may have taken effect all the same (a 5xx, a read timeout, a dropped
    connection): a create that ends so must be looked up, never retried blindly.
    """

    def __init__(self, message: str, *, status: int | None = None, uncertain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.uncertain = uncertain


class AuthError(MarketplaceError):
    """HTTP 401/403: the API key is missing, wrong or lacks a permission."""


class NotFoundError(MarketplaceError):
    """HTTP 404: the template, instance or offer does not exist (any more)."""


class AmbiguousError(MarketplaceError):
    """A write whose outcome is unknown (5xx, read timeout, connection lost after sending):
    the server may have done it. Never retried blindly: the caller looks the object up."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, status=status, uncertain=True)


class _CreateSafeRetry(Retry):
    """Retry 429 and 5xx with backoff, but a POST only on 429 (not processed by the server)."""

    creates: tuple[str, ...] | None = ("POST",)  # the methods that create; None: every one

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if (self.creates is None or method.upper() in self.creates) and status_code != 429:
            return False
        return super().is_retry(method, status_code, has_retry_after)


class _CreateRetry(_CreateSafeRetry):
    """For a create sent with another method (Vast.ai rents with PUT): 429 only, whatever the method."""

    creates = None

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), MAX_RETRY_AFTER)


class _CappedRetry(Retry):
    """urllib3's Retry, with Retry-After capped as above."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), MAX_RETRY_AFTER)


def make_session(*, retries: int = 5, backoff: float = 1.0, create_safe: bool = True, creates: bool = False) -> requests.Session:
    """A `requests.Session` whose adapters retry 429/5xx with exponential backoff.

    `create_safe=False` also retries a POST on 5xx: for POSTs that only read (a search).
    `creates=True` retries no method on 5xx: for a create sent with PUT.
    """
    retry = (_CreateRetry if creates else _CreateSafeRetry if create_safe else _CappedRetry)(
        total=retries,
        connect=retries,
        read=0,  # a read timeout after a mutation is not retried blindly
        status=retries,
        backoff_factor=backoff,
        backoff_max=60.0,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # every method; POST is narrowed by _CreateSafeRetry
        respect_retry_after_header=True,
        raise_on_status=False,  # hand back the last response; we turn it into an error
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = "gpubake-marketplace"
    return session


@dataclass
class PlannedRequest:
    """A request as `--dry-run` shows it: secrets already replaced by `***`."""

    method: str
    url: str
    headers: dict[str, str]
    body: Any = None
    sent: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.url, "headers": self.headers, "body": self.body, "sent": self.sent}

    def render(self) -> str:
        head = f"{self.method} {self.url}"
        lines = [head] + [f"{k}: {v}" for k, v in sorted(self.headers.items())]
        if self.body is not None:
            lines.append(json.dumps(self.body, indent=2, sort_keys=True))
        return "\n".join(lines)


def redact_obj(obj: Any, secrets: list[str]) -> Any:
    """Deep copy of a JSON value with secret-named keys and known secret values masked."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if isinstance(value, str) and value and (is_secret_name(str(key)) or str(key).endswith("_pass")):
                out[key] = REDACTED
            else:
                out[key] = redact_obj(value, secrets)
        return out
    if isinstance(obj, list):
        return [redact_obj(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact(obj, secrets)
    return obj


@dataclass
class ApiClient:
    """A marketplace REST API at `base_url`, authenticated with a bearer API key."""

    api: str  # "RunPod" / "Vast.ai", for messages
    base_url: str
    api_key: str | None
    key_hint: str  # where the key comes from, for the 401 message
    dry_run: bool = False
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    retries: int = 5
    backoff: float = 1.0
    extra_secrets: list[str] = field(default_factory=list)
    planned: list[PlannedRequest] = field(default_factory=list)
    session: requests.Session | None = None
    read_session: requests.Session | None = None
    create_session: requests.Session | None = None

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.session is None:
            self.session = make_session(retries=self.retries, backoff=self.backoff)
        if self.read_session is None:
            self.read_session = make_session(retries=self.retries, backoff=self.backoff, create_safe=False)
        if self.create_session is None:
            self.create_session = make_session(retries=self.retries, backoff=self.backoff, creates=True)

    # ---------------------------------------------------------------- helpers
    @property
    def secrets(self) -> list[str]:
        return [s for s in [self.api_key, *self.extra_secrets] if s]

    def _scrub(self, text: str) -> str:
        return redact(text, self.secrets)

    def _url(self, path: str, params: dict[str, Any] | None) -> str:
        url = self.base_url + path
        if params:
            url += "?" + urlencode(params)
        return url

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _plan(self, method: str, url: str, body: Any, *, sent: bool) -> PlannedRequest:
        shown_headers = {k: (f"Bearer {REDACTED}" if k == "Authorization" else v) for k, v in self._headers().items()}
        if body is not None:
            shown_headers["Content-Type"] = "application/json"
        planned = PlannedRequest(method, self._scrub(url), shown_headers, redact_obj(body, self.secrets), sent=sent)
        self.planned.append(planned)
        return planned

    def plan(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> PlannedRequest:
        """Record a request for --dry-run without sending it."""
        return self._plan(method.upper(), self._url(path, params), body, sent=False)

    # ---------------------------------------------------------------- the one entry point
    def can_read(self) -> bool:
        """In dry-run, reads are still sent when a key is configured (they change nothing)."""
        return bool(self.api_key) or not self.dry_run

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
                read_only: bool = False, create: bool = False) -> Any:
        """Send one request; return its decoded JSON (None for an empty body).

        In dry-run, a mutating request is only recorded and `None` is returned. `read_only`
        marks a POST that changes nothing (a search): it is retried like a GET and sent in
        dry-run too. `create` marks a request that rents or creates whatever its method (a
        POST always is one): retried on 429 only, and an `AmbiguousError` on 5xx or timeout.
        """
        method = method.upper()
        url = self._url(path, params)
        if self.dry_run and method in MUTATING and not read_only:
            planned = self._plan(method, url, json_body, sent=False)
            log.info("dry-run: %s %s", method, planned.url)
            return None
        if not self.api_key:
            raise AuthError(f"{self.api}: no API key; {self.key_hint}")
        if self.dry_run:
            self._plan(method, url, json_body, sent=True)
        session = self.create_session if create else self.read_session if read_only else self.session
        assert session is not None
        write = method in MUTATING and not read_only
        try:
            resp = session.request(
                method, url, json=json_body, headers=self._headers(), timeout=self.timeout, allow_redirects=False
            )
        except requests.exceptions.RetryError as exc:
            raise MarketplaceError(f"{self.api}: {method} {path}: gave up after {self.retries} retries ({self._reason(exc)})") from None
        except requests.exceptions.ConnectTimeout:
            raise MarketplaceError(f"{self.api}: cannot reach {self._scrub(self.base_url)} (ConnectTimeoutError)") from None
        except requests.exceptions.Timeout:
            raise self._lost(write, method, path, f"timed out after {self.timeout[1]:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            reason = self._reason(exc)
            if reason == "ReadTimeoutError":  # urllib3 wraps it when read retries are off
                raise self._lost(write, method, path, f"timed out after {self.timeout[1]:g} s") from None
            if write and reason not in _NOT_SENT:
                raise self._lost(True, method, path, f"connection lost ({reason})") from None
            raise MarketplaceError(f"{self.api}: cannot reach {self._scrub(self.base_url)} ({reason})") from None
        log.debug("%s %s -> %s", method, self._scrub(url), resp.status_code)
        return self._decode(method, path, resp, write=write)

    def _lost(self, write: bool, method: str, path: str, what: str) -> MarketplaceError:
        """The error for a request whose answer never came: ambiguous when it was a write."""
        if write:
            return AmbiguousError(f"{self.api}: {method} {path}: {what}; it may have been done")
        return MarketplaceError(f"{self.api}: {method} {path}: {what}")

    def _reason(self, exc: Exception) -> str:
        """The root cause's class name (urllib3 wraps it in MaxRetryError.reason), never a URL."""
        inner = exc.args[0] if exc.args else None
        reason = getattr(inner, "reason", None)
        if reason is not None:
            return type(reason).__name__
        return self._scrub(type(inner or exc).__name__)

    def _decode(self, method: str, path: str, resp: requests.Response, *, write: bool = False) -> Any:
        status = resp.status_code
        if status == 401:
            raise AuthError(f"{self.api}: API key rejected (HTTP 401) on {method} {path}; {self.key_hint}", status=status)
        if status == 403:
            raise AuthError(
                f"{self.api}: the API key lacks the permission for {method} {path} (HTTP 403: {self._detail(resp)}); "
                f"use a key with read/write access ({self.key_hint})", status=status)
        if status == 404:
            raise NotFoundError(f"{self.api}: not found (HTTP 404): {method} {path}: {self._detail(resp)}", status=status)
        if status == 429:
            wait = resp.headers.get("Retry-After")
            after = f"; the API asks to wait {self._scrub(wait)} s" if wait else ""
            raise MarketplaceError(f"{self.api}: rate limited (HTTP 429) on {method} {path} after {self.retries} retries{after}",
                                   status=status)
        if status >= 500:
            cls = AmbiguousError if write else MarketplaceError
            done = "; it may have been done" if write else ""
            raise cls(f"{self.api}: server error (HTTP {status}) on {method} {path}: {self._detail(resp)}{done}", status=status)
        if status >= 400:
            raise MarketplaceError(
                f"{self.api}: {method} {path} refused (HTTP {status}): {self._detail(resp)}{self._field_errors(resp)}", status=status)
        if status >= 300:  # redirects are not followed: an API that moved must be configured, not guessed
            raise MarketplaceError(f"{self.api}: {method} {path}: unexpected redirect (HTTP {status}); check the API URL", status=status)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise MarketplaceError(f"{self.api}: {method} {path}: response is not JSON (HTTP {status})",
                                   status=status, uncertain=method in MUTATING) from None

    def _field_errors(self, resp: requests.Response) -> str:
        """RFC 9457 problem `errors` (RunPod v2's list of validation failures), as ` [a; b]`."""
        try:
            data = resp.json()
        except ValueError:
            return ""
        errors = data.get("errors") if isinstance(data, dict) else None
        if not isinstance(errors, list) or not errors:
            return ""
        return " [" + " ".join(self._scrub("; ".join(str(e) for e in errors)).split())[:300] + "]"

    def _detail(self, resp: requests.Response) -> str:
        try:
            data = resp.json()
        except ValueError:
            text = resp.text
        else:
            if isinstance(data, dict):
                # Vast.ai puts a code in `error` (`no_such_ask`) and the reason in `msg`
                text = str(data.get("msg") or data.get("error") or data.get("message") or data.get("detail") or data)
            else:
                text = str(data)
        return " ".join(self._scrub(text).split())[:200] or "(no message)"
