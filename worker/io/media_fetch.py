"""Reading media bytes (s3:// and file://) under size and location limits.

`MediaFetcher` reads a URL's bytes, never more than the caller's limit, and
only from the allowed buckets and the allowed file root. Every failure is one
of the typed exceptions below (boto's ClientError and BotoCoreError are
translated here); `worker/jobs/errors.py` decides what each means for the job.
`worker/io/results_store.py` writes results with the same helpers.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)

from api_client.errors import ServiceError
from api_client.schema import ErrorCode

_CHUNK = 1024 * 1024
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_FORBIDDEN_CODES = {"403", "AccessDenied", "AllAccessDisabled", "InvalidObjectState"}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestTimeout", "RequestTimeoutException", "ServiceUnavailable",
    "InternalError", "503", "500",
}  # fmt: skip


class StorageError(ServiceError):
    """Base of every storage failure; a bare one is permanent and unexpected."""


class MediaNotFound(StorageError):
    """The object, bucket or file does not exist."""

    code = ErrorCode.media_not_found


class MediaTooLarge(StorageError):
    """The object is larger than the limit; it was not (fully) downloaded."""

    code = ErrorCode.media_too_large


class ForbiddenMedia(StorageError):
    """The URL points outside what this worker may read."""

    code = ErrorCode.forbidden_url


class InvalidMediaUrl(ForbiddenMedia):
    """The URL is malformed or uses a scheme this store does not read."""


class StorageUnavailable(StorageError):
    """Transient: 5xx, throttling, timeout, connection failure. The caller retries."""

    code = ErrorCode.storage_unavailable
    retryable = True


def default_boto_config() -> Config:
    return Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=32,
    )


def make_s3_client(
    endpoint_url: str | None = None, *, boto_config: Config | None = None, **client_kwargs: Any
) -> BaseClient:
    """A boto3 S3 client (thread-safe once built; built from its own Session,
    because the default session is not safe to share between threads)."""
    import boto3

    config = default_boto_config()
    if boto_config is not None:
        config = config.merge(boto_config)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, config=config, **client_kwargs
    )


def check_key(key: str) -> str:
    """An object key (or a path under a file store's root), refused if it could escape."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidMediaUrl(f"invalid object key {key!r}")
    if any(part in ("..", ".") for part in key.split("/")):
        raise ForbiddenMedia(f"object key {key!r} has '.' or '..' segments")
    return key


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key). Keys are taken verbatim, like the AWS CLI."""
    if not url.startswith("s3://"):
        raise InvalidMediaUrl("not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not BUCKET_RE.match(bucket):
        raise InvalidMediaUrl(f"invalid bucket name {bucket!r}")
    return bucket, check_key(key)


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query:
        raise InvalidMediaUrl("file URLs must look like file:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidMediaUrl("file URLs must hold an absolute path")
    if ".." in path.split("/"):
        raise ForbiddenMedia("file path has '..' segments")
    return path


def translate_client_error(exc: ClientError, what: str) -> StorageError:
    """An S3 error response -> not found, unavailable (retry), forbidden, or a bare StorageError."""
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    if code in _NOT_FOUND_CODES or status == 404:
        return MediaNotFound(f"{what}: not found ({code or status})")
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return StorageUnavailable(f"{what}: storage unavailable ({code or status})")
    if code in _FORBIDDEN_CODES or status == 403:
        return ForbiddenMedia(f"{what}: access denied ({code or status})")
    return StorageError(f"{what}: {code or status}")


def translate_boto_error(exc: BotoCoreError, what: str) -> StorageError:
    """A client-side boto failure -> unavailable (connection trouble) or a bare StorageError."""
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what}: no S3 credentials configured")
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return StorageUnavailable(f"{what}: {type(exc).__name__}")
    return StorageError(f"{what}: {type(exc).__name__}")


def _read_capped(read: Callable[[int], bytes], max_bytes: int, what: str) -> bytes:
    """Read from `read(n)` until EOF, never more than max_bytes + 1 bytes in all."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise MediaTooLarge(f"{what}: larger than {max_bytes} bytes")


def s3_get_capped(client: BaseClient, bucket: str, key: str, max_bytes: int, *, what: str) -> bytes:
    """One object's bytes; refused from Content-Length before the body is read when it is too large."""
    try:
        resp = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise translate_client_error(exc, what) from None
    except BotoCoreError as exc:
        raise translate_boto_error(exc, what) from None
    body = resp["Body"]
    try:
        # Refuse from the header first: the body is never downloaded.
        if int(resp.get("ContentLength") or 0) > max_bytes:
            raise MediaTooLarge(f"{what}: {resp['ContentLength']} bytes > limit {max_bytes}")
        return _read_capped(body.read, max_bytes, what)
    except BotoCoreError as exc:
        raise translate_boto_error(exc, what) from None
    finally:
        body.close()


def file_get_capped(path: Path, max_bytes: int, *, what: str) -> bytes:
    """A regular file's bytes; FIFOs, devices and directories read as not found."""
    try:
        # O_NONBLOCK: opening a FIFO planted under the root must not hang the thread.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise MediaNotFound(f"{what}: not a regular file")
            if st.st_size > max_bytes:
                raise MediaTooLarge(f"{what}: {st.st_size} bytes > limit {max_bytes}")
            return _read_capped(f.read, max_bytes, what)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise MediaNotFound(f"{what}: no such file") from None
    except PermissionError:
        raise ForbiddenMedia(f"{what}: permission denied") from None


class MediaFetcher:
    """Reads media bytes from s3:// or file:// URLs, within the configured limits.

    The S3 client is built on first use (a file-only deployment never needs
    one) and then shared by every task thread.
    """

    def __init__(
        self,
        *,
        allowed_file_root: Path | None = None,
        s3_allowed_buckets: tuple[str, ...] | list[str] = (),
        s3_endpoint_url: str | None = None,
        boto_config: Config | None = None,
        s3_client: BaseClient | None = None,
    ) -> None:
        self.allowed_file_root = Path(allowed_file_root).resolve() if allowed_file_root else None
        self.s3_allowed_buckets = frozenset(s3_allowed_buckets)
        self._endpoint_url = s3_endpoint_url
        self._boto_config = boto_config
        self._client = s3_client
        self._client_lock = threading.Lock()

    @property
    def s3(self) -> BaseClient:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = make_s3_client(self._endpoint_url, boto_config=self._boto_config)
        return self._client

    def get_bytes(self, url: str, *, max_bytes: int) -> bytes:
        if url.startswith("s3://"):
            return self._get_s3(url, max_bytes)
        if url.startswith("file://"):
            return self._get_file(url, max_bytes)
        raise InvalidMediaUrl(f"unsupported media URL scheme: {url.split(':', 1)[0]!r}")

    def _get_s3(self, url: str, max_bytes: int) -> bytes:
        bucket, key = parse_s3_url(url)
        if self.s3_allowed_buckets and bucket not in self.s3_allowed_buckets:
            raise ForbiddenMedia(f"bucket {bucket!r} is not in the allowed list")
        return s3_get_capped(self.s3, bucket, key, max_bytes, what=url)

    def _get_file(self, url: str, max_bytes: int) -> bytes:
        if self.allowed_file_root is None:
            raise ForbiddenMedia("file:// media is not enabled on this worker")
        # resolve() follows symlinks, so a link pointing out of the root is refused.
        path = Path(_file_url_path(url)).resolve()
        if not path.is_relative_to(self.allowed_file_root):
            raise ForbiddenMedia("file path is outside the allowed root")
        return file_get_capped(path, max_bytes, what=url)
