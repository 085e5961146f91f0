"""Where results go: result JSON written under a store's prefix, read back, deleted.

A store is either an S3 bucket + prefix (AWS, or MinIO/any S3 endpoint) or a
local directory. `open_store` also builds the `worker.io.media_fetch.MediaFetcher`
that reads media (s3:// and file://, whatever the store's kind) and hands it
over as `store.fetcher`, sharing the S3 client. Failures are the typed
exceptions of `worker/io/media_fetch.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.io.media_fetch import (
    BUCKET_RE,
    MediaFetcher,
    MediaNotFound,
    check_key,
    file_get_capped,
    s3_get_capped,
    translate_boto_error,
    translate_client_error,
)

MAX_JSON_BYTES = 64 * 1024 * 1024  # a result JSON is small; this only bounds a corrupt one


class ObjectStore:
    """Where results go: `put_json(key)` under the store's own prefix.

    `fetcher` is the media reader built with it (it shares the S3 client).
    """

    def __init__(self, fetcher: MediaFetcher) -> None:
        self.fetcher = fetcher

    def url_for(self, key: str) -> str:
        raise NotImplementedError

    def put_json(self, key: str, obj: dict) -> str:
        raise NotImplementedError

    def get_json(self, key: str) -> dict:
        raise NotImplementedError

    def put_file(self, key: str, path: Path) -> str:
        """Store a local file (a batch's results, written line by line first) under `key`."""
        raise NotImplementedError

    def iter_lines(self, key: str) -> Iterator[bytes]:
        """The object's lines, read as they stream (a batch's results file)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error."""
        raise NotImplementedError


class FileStore(ObjectStore):
    """A local directory. Writes are atomic (temp file + fsync + os.replace)."""

    def __init__(self, root: Path, fetcher: MediaFetcher | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(fetcher or MediaFetcher(allowed_file_root=self.root))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_json(self, key: str, obj: dict) -> str:
        path = self._path(key)
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.url_for(key)

    def get_json(self, key: str) -> dict:
        path = self._path(key)
        return json.loads(file_get_capped(path, MAX_JSON_BYTES, what=self.url_for(key)))

    def put_file(self, key: str, path: Path) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.url_for(key)

    def iter_lines(self, key: str) -> Iterator[bytes]:
        try:
            with open(self._path(key), "rb") as f:
                yield from f
        except FileNotFoundError:
            raise MediaNotFound(f"{self.url_for(key)}: no such file") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"


class S3Store(ObjectStore):
    """A bucket and a key prefix; the client is shared with the media fetcher."""

    def __init__(self, bucket: str, prefix: str, client: BaseClient, fetcher: MediaFetcher | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        super().__init__(fetcher or MediaFetcher(s3_client=client))

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_json(self, key: str, obj: dict) -> str:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        url = self.url_for(key)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json"
            )
        except ClientError as exc:
            raise translate_client_error(exc, url) from None
        except BotoCoreError as exc:
            raise translate_boto_error(exc, url) from None
        return url

    def get_json(self, key: str) -> dict:
        raw = s3_get_capped(self.client, self.bucket, self._key(key), MAX_JSON_BYTES, what=self.url_for(key))
        return json.loads(raw)

    def put_file(self, key: str, path: Path) -> str:
        url = self.url_for(key)
        try:  # multipart above boto3's threshold: a large file never sits in memory
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    ExtraArgs={"ContentType": "application/jsonl"})
        except ClientError as exc:
            raise translate_client_error(exc, url) from None
        except BotoCoreError as exc:
            raise translate_boto_error(exc, url) from None
        return url

    def iter_lines(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            raise translate_client_error(exc, self.url_for(key)) from None
        try:
            for line in body.iter_lines():
                yield line + b"\n"
        finally:
            body.close()

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            raise translate_client_error(exc, self.url_for(key)) from None
        except BotoCoreError as exc:
            raise translate_boto_error(exc, self.url_for(key)) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            err = translate_client_error(exc, self.url_for(key))
            if isinstance(err, MediaNotFound):
                return False
            raise err from None
        except BotoCoreError as exc:
            raise translate_boto_error(exc, self.url_for(key)) from None

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"


def open_store(
    store_url: str,
    *,
    s3_endpoint_url: str | None = None,
    allowed_file_root: Path | None = None,
    s3_allowed_buckets: tuple[str, ...] | list[str] = (),
    boto_config: Config | None = None,
    s3_client: BaseClient | None = None,
) -> ObjectStore:
    """Build the store named by `s3://bucket/prefix` or `file:///dir`.

    `allowed_file_root=None` disables file:// media. `s3_client` (optional)
    replaces the client built from the default AWS credential chain.
    """
    fetcher = MediaFetcher(
        allowed_file_root=allowed_file_root,
        s3_allowed_buckets=s3_allowed_buckets,
        s3_endpoint_url=s3_endpoint_url,
        boto_config=boto_config,
        s3_client=s3_client,
    )
    if store_url.startswith("s3://"):
        bucket, _, prefix = store_url[len("s3://") :].partition("/")
        if not BUCKET_RE.match(bucket):
            raise ValueError(f"invalid bucket in store URL: {bucket!r}")
        return S3Store(bucket, prefix, fetcher.s3, fetcher)
    if store_url.startswith("file://"):
        parts = urlsplit(store_url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file store URLs must look like file:///absolute/dir")
        return FileStore(Path(unquote(parts.path)), fetcher)
    raise ValueError(f"unsupported store URL scheme: {store_url.split(':', 1)[0]!r}")
