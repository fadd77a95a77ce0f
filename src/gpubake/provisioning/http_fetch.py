"""`https://` (and `http://`) sources: a directory URL holding a gpubake manifest, or one file.

requests with urllib3 `Retry` for connection errors and 429/5xx, and HTTP Range
requests to resume a `.partial` file. A server that ignores Range (200 instead of
206) makes the file restart from zero instead of silently corrupting it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import quote, urlsplit

from gpubake.errors import FetchError
from gpubake.provisioning.manifest import MANIFEST_NAME, parse_manifest
from gpubake.provisioning.transfer import CHUNK, Interrupted, RemoteFile

TIMEOUT = (10, 60)  # connect, read (seconds)
_RETRY_STATUS = (429, 500, 502, 503, 504)


def _session(retries: int):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    s = requests.Session()
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        backoff_factor=0.25,
        status_forcelist=_RETRY_STATUS,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = "gpubake-fetch"
    return s


class HttpSource:
    """A checkpoint directory (URL ending in '/' or in the manifest's name) or a single file."""

    def __init__(self, url: str, *, retries: int = 4) -> None:
        self.url = url
        self.retries = retries
        self._session = _session(retries)
        path = urlsplit(url).path
        if url.endswith("/") or path.endswith("/" + MANIFEST_NAME):
            self.base = url[: url.rfind("/") + 1]
            self.single: str | None = None
        else:
            self.base = url[: url.rfind("/") + 1]
            self.single = path.rsplit("/", 1)[-1]
            if not self.single:
                raise FetchError(f"{url}: no file name in the URL")
        self._manifest: bytes | None = None

    def describe(self) -> str:
        """The URL for progress lines, plans and the manifest's `source`: credentials redacted."""
        from gpubake.secrets import redact_url

        return redact_url(self.url)

    def _get(self, url: str, headers: dict[str, str] | None = None, stream: bool = False):
        import requests

        try:
            resp = self._session.get(url, headers=headers or {}, stream=stream, timeout=TIMEOUT)
        except requests.exceptions.RetryError as exc:
            raise FetchError(f"{url}: server kept failing ({exc.__class__.__name__})") from None
        except requests.exceptions.ConnectionError as exc:
            raise FetchError(f"{url}: unreachable ({_reason(exc)})") from None
        except requests.exceptions.RequestException as exc:
            raise FetchError(f"{url}: {exc.__class__.__name__}: {_reason(exc)}") from None
        if resp.status_code in (401, 403):
            raise FetchError(f"{url}: HTTP {resp.status_code} (missing or wrong credentials)")
        if resp.status_code == 404:
            raise FetchError(f"{url}: HTTP 404 (not found)")
        if resp.status_code in _RETRY_STATUS:
            raise FetchError(f"{url}: HTTP {resp.status_code} (server kept failing after {self.retries} retries)")
        if resp.status_code >= 400 and resp.status_code != 416:
            raise FetchError(f"{url}: HTTP {resp.status_code}")
        return resp

    def manifest_bytes(self) -> bytes | None:
        if self.single is not None:
            return None
        if self._manifest is None:
            self._manifest = self._get(self.base + MANIFEST_NAME).content
        return self._manifest

    def list_files(self) -> list[RemoteFile]:
        if self.single is not None:
            return [RemoteFile(self.single, None)]
        raw = self.manifest_bytes()
        assert raw is not None
        manifest = parse_manifest(raw, origin=self.base + MANIFEST_NAME)
        return [RemoteFile(rel, e["size"]) for rel, e in manifest["files"].items()]

    def open_range(self, rel: str, offset: int) -> tuple[Iterable[bytes], bool]:
        url = self.base + quote(rel)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._get(url, headers=headers, stream=True)
        if resp.status_code == 416:  # offset at/after the end: nothing more to send
            resp.close()
            return iter(()), True
        honoured = offset == 0 or resp.status_code == 206
        return _iter_body(resp), honoured


def _iter_body(resp) -> Iterator[bytes]:
    import requests
    import urllib3

    try:
        yield from resp.iter_content(CHUNK)
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError) as exc:
        raise Interrupted(f"{resp.url}: stream broke ({_reason(exc)})") from None
    finally:
        resp.close()


def _reason(exc: BaseException) -> str:
    """The innermost useful message of a requests/urllib3 error, on one line."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    text = str(inner) or inner.__class__.__name__
    return " ".join(text.split())[:200]
