"""S3-compatible storage (AWS S3, Cloudflare R2, Backblaze B2, MinIO) for `fetch` and `push-weights`.

One module for both directions so that credentials, endpoint handling and error
messages are the same. Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, instance roles); the endpoint from the
`--endpoint-url` flag or AWS_ENDPOINT_URL. Nothing here logs or stores a secret.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpubake.errors import FetchError, GpubakeError
from gpubake.provisioning.manifest import MANIFEST_NAME, list_files, parse_manifest
from gpubake.provisioning.transfer import CHUNK, Interrupted, RemoteFile

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "403",
}


class StorageError(GpubakeError):
    """An S3 request failed: credentials, bucket, endpoint."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str  # no leading slash; '' or ends with '/'

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_uri(uri: str) -> S3Uri:
    """s3://bucket[/prefix] -> S3Uri (prefix normalised to end with '/')."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri}: not an s3:// URI")
    rest = uri[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name")
    prefix = prefix.strip("/")
    return S3Uri(bucket, prefix + "/" if prefix else "")


def client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client with retries; endpoint from the argument or AWS_ENDPOINT_URL."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                 signature_version="s3v4", s3={"addressing_style": "path"} if endpoint_url else {})
    # A fresh session each time: boto3's default session caches the credentials it
    # first resolved, so a changed environment would otherwise be ignored.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=cfg,
    )


def error_message(exc: BaseException, what: str) -> str:
    """One line for a botocore exception, naming `what` (the URI or key)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if isinstance(exc, EndpointConnectionError):
        return f"{what}: S3 endpoint unreachable ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _AUTH_CODES:
            return f"{what}: S3 refused the credentials ({code})"
        if code in ("NoSuchBucket", "404", "NoSuchKey"):
            return f"{what}: not found ({code})"
        return f"{what}: S3 error {code or exc.__class__.__name__}"
    return f"{what}: {exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}"


def _boto_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


class S3Source:
    """All objects under s3://bucket/prefix/ as one checkpoint."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None) -> None:
        self.uri = parse_s3_uri(uri)
        self._s3 = client(endpoint_url)
        self._manifest: bytes | None | bool = False  # False: not looked up yet

    def describe(self) -> str:
        return str(self.uri)

    def _listing(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.uri.bucket, Prefix=self.uri.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.uri.prefix):]
                    if rel and not rel.endswith("/"):
                        out[rel] = obj["Size"]
        except _boto_errors() as exc:
            raise FetchError(error_message(exc, str(self.uri))) from None
        if not out:
            raise FetchError(f"{self.uri}: no objects under this prefix")
        return out

    def manifest_bytes(self) -> bytes | None:
        if self._manifest is False:
            try:
                obj = self._s3.get_object(Bucket=self.uri.bucket, Key=self.uri.prefix + MANIFEST_NAME)
                self._manifest = obj["Body"].read()
            except _boto_errors() as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404"):
                    self._manifest = None
                else:
                    raise FetchError(error_message(exc, f"{self.uri}{MANIFEST_NAME}")) from None
        return self._manifest  # type: ignore[return-value]

    def list_files(self) -> list[RemoteFile]:
        raw = self.manifest_bytes()
        if raw is not None:
            manifest = parse_manifest(raw, origin=f"{self.uri}{MANIFEST_NAME}")
            return [RemoteFile(rel, e["size"]) for rel, e in manifest["files"].items()]
        return [RemoteFile(rel, size) for rel, size in sorted(self._listing().items()) if rel != MANIFEST_NAME]

    def open_range(self, rel: str, offset: int) -> tuple[Iterable[bytes], bool]:
        key = self.uri.prefix + rel
        kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Key": key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            obj = self._s3.get_object(**kwargs)
        except _boto_errors() as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code == "InvalidRange":
                return iter(()), True
            raise FetchError(error_message(exc, f"s3://{self.uri.bucket}/{key}")) from None
        honoured = offset == 0 or "ContentRange" in obj
        return _iter_body(obj["Body"], key), honoured


def _iter_body(body: Any, key: str) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    except _boto_errors() + (OSError,) as exc:
        raise Interrupted(f"{key}: stream broke ({exc.__class__.__name__})") from None
    finally:
        body.close()


def upload_dir(
    src: str | os.PathLike[str],
    s3_uri: str,
    *,
    endpoint_url: str | None = None,
    jobs: int = 4,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Upload every file under `src` to s3_uri (used by `push-weights`).

    The gpubake manifest is uploaded LAST, so a reader that trusts the manifest never
    sees a checkpoint whose files are not all there yet. Multipart for big files
    (boto3's transfer manager); returns {"uri", "files", "bytes", "keys"}.
    """
    from boto3.s3.transfer import TransferConfig

    root = Path(src)
    if not root.is_dir():
        raise StorageError(f"{root}: not a directory")
    uri = parse_s3_uri(s3_uri)
    rels = list_files(root)
    if (root / MANIFEST_NAME).is_file():
        rels.append(MANIFEST_NAME)  # last on purpose
    total = sum((root / r).stat().st_size for r in rels)
    result = {"uri": str(uri), "files": len(rels), "bytes": total, "keys": [uri.prefix + r for r in rels]}
    if dry_run:
        return result
    s3 = client(endpoint_url)
    cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=jobs)
    body, last = rels[:-1], rels[-1:]
    try:
        from concurrent.futures import ThreadPoolExecutor

        def put(rel: str) -> None:
            s3.upload_file(str(root / rel), uri.bucket, uri.prefix + rel, Config=cfg, Callback=progress)

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(put, body))
        for rel in last:
            put(rel)
    except _boto_errors() as exc:
        raise StorageError(error_message(exc, str(uri))) from None
    except Exception as exc:  # boto3's S3UploadFailedError wraps ClientError
        if exc.__class__.__name__ == "S3UploadFailedError":
            raise StorageError(f"{uri}: upload failed ({' '.join(str(exc).split())[:200]})") from None
        raise
    return result
