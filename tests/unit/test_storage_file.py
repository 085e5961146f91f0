"""FileStore and file:// media reads: round trip, atomic writes, limits, escapes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from worker.io.media_fetch import (
    ForbiddenMedia,
    InvalidMediaUrl,
    MediaFetcher,
    MediaNotFound,
    MediaTooLarge,
    StorageError,
    StorageUnavailable,
)
from worker.io.results_store import FileStore, open_store


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def test_put_get_json_round_trip(store: FileStore) -> None:
    obj = {"job_id": "j1", "text": "héllo", "usage": {"prompt_tokens": 3}}
    url = store.put_json("results/j1.json", obj)
    assert url == (store.root / "results" / "j1.json").as_uri()
    assert store.exists("results/j1.json")
    assert not store.exists("results/j2.json")
    assert store.get_json("results/j1.json") == obj
    # the returned URL reads back as media too (same bytes)
    assert json.loads(store.fetcher.get_bytes(url, max_bytes=1024)) == obj


def test_put_json_is_atomic_and_leaves_no_temp_files(store: FileStore) -> None:
    store.put_json("results/a.json", {"v": 1})
    store.put_json("results/a.json", {"v": 2})
    names = sorted(p.name for p in (store.root / "results").iterdir())
    assert names == ["a.json"]
    assert store.get_json("results/a.json") == {"v": 2}


def test_failed_write_keeps_previous_version(store: FileStore) -> None:
    store.put_json("results/a.json", {"v": 1})
    with pytest.raises(TypeError):
        store.put_json("results/a.json", {"v": object()})  # not JSON-serialisable
    assert store.get_json("results/a.json") == {"v": 1}
    assert [p.name for p in (store.root / "results").iterdir()] == ["a.json"]


def test_get_json_missing_is_not_found(store: FileStore) -> None:
    with pytest.raises(MediaNotFound):
        store.get_json("results/nope.json")


@pytest.mark.parametrize("key", ["../escape.json", "a/../../b.json", "/abs.json", "", "a/./b"])
def test_bad_keys_are_refused(store: FileStore, key: str) -> None:
    with pytest.raises(ForbiddenMedia):
        store.put_json(key, {"x": 1})
    assert not (store.root.parent / "escape.json").exists()


def test_get_bytes_reads_under_root(store: FileStore) -> None:
    (store.root / "media").mkdir()
    (store.root / "media" / "a b.jpg").write_bytes(b"\xff\xd8abc")
    url = (store.root / "media" / "a b.jpg").as_uri()  # percent-encoded space
    assert store.fetcher.get_bytes(url, max_bytes=10) == b"\xff\xd8abc"


def test_missing_file_is_not_found(store: FileStore) -> None:
    with pytest.raises(MediaNotFound):
        store.fetcher.get_bytes((store.root / "nope.jpg").as_uri(), max_bytes=10)
    (store.root / "dir").mkdir()
    with pytest.raises(MediaNotFound):
        store.fetcher.get_bytes((store.root / "dir").as_uri(), max_bytes=10)


def test_path_traversal_is_forbidden(tmp_path: Path, store: FileStore) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes(f"file://{store.root}/../secret.txt", max_bytes=100)
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes(f"file://{store.root}/%2e%2e/secret.txt", max_bytes=100)
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes(secret.as_uri(), max_bytes=100)


def test_sibling_directory_with_common_prefix_is_forbidden(tmp_path: Path, store: FileStore) -> None:
    sibling = tmp_path / "store-evil"
    sibling.mkdir()
    (sibling / "x.jpg").write_bytes(b"x")
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes((sibling / "x.jpg").as_uri(), max_bytes=100)


def test_symlink_escape_is_forbidden(tmp_path: Path, store: FileStore) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    (store.root / "link.jpg").symlink_to(secret)
    (store.root / "linkdir").symlink_to(tmp_path)
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes((store.root / "link.jpg").as_uri(), max_bytes=100)
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes((store.root / "linkdir" / "secret.txt").as_uri(), max_bytes=100)


def test_symlink_inside_root_is_allowed(store: FileStore) -> None:
    (store.root / "real.jpg").write_bytes(b"ok")
    (store.root / "alias.jpg").symlink_to(store.root / "real.jpg")
    assert store.fetcher.get_bytes((store.root / "alias.jpg").as_uri(), max_bytes=10) == b"ok"


def test_size_limit_from_stat(store: FileStore) -> None:
    path = store.root / "big.bin"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(MediaTooLarge):
        store.fetcher.get_bytes(path.as_uri(), max_bytes=1000)
    assert store.fetcher.get_bytes(path.as_uri(), max_bytes=1001) == b"x" * 1001


def test_sparse_huge_file_is_refused_without_reading(store: FileStore) -> None:
    # 64 GiB apparent size, no disk used: reading it would take minutes and all memory.
    path = store.root / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(64 * 1024**3)
    with pytest.raises(MediaTooLarge):
        store.fetcher.get_bytes(path.as_uri(), max_bytes=1024)


def test_fifo_is_not_read(store: FileStore) -> None:
    fifo = store.root / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(MediaNotFound):  # must return at once, not block on the pipe
        store.fetcher.get_bytes(fifo.as_uri(), max_bytes=10)


def test_file_media_disabled_without_root(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"a")
    fetcher = MediaFetcher(allowed_file_root=None)
    with pytest.raises(ForbiddenMedia):
        fetcher.get_bytes((tmp_path / "a.jpg").as_uri(), max_bytes=10)


@pytest.mark.parametrize(
    "url",
    ["file://otherhost/etc/passwd", "file:relative/path", "ftp://x/y", "s3://Bad_Bucket/k", "s3://bucket"],
)
def test_malformed_urls_are_refused(store: FileStore, url: str) -> None:
    with pytest.raises(InvalidMediaUrl):
        store.fetcher.get_bytes(url, max_bytes=10)


def test_open_store_file_url(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(b"png")
    store = open_store((tmp_path / "st").as_uri(), allowed_file_root=media)
    assert isinstance(store, FileStore)
    url = store.put_json("results/x.json", {"a": 1})
    assert Path(url[len("file://") :]).is_file()
    assert store.fetcher.get_bytes((media / "a.png").as_uri(), max_bytes=3) == b"png"
    # the store directory itself is not under the media root here
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes(url, max_bytes=100)
    with pytest.raises(ValueError):
        open_store("gs://bucket/prefix")


class CountingBody:
    """An S3 body that lies about nothing but counts what was read from it."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.read_total = 0
        self.closed = False

    def read(self, amt: int) -> bytes:
        n = min(amt, self.remaining)
        self.remaining -= n
        self.read_total += n
        return b"x" * n

    def close(self) -> None:
        self.closed = True


class FakeS3:
    """Same get_object shape as boto3; answers with a fixed body or error."""

    def __init__(self, body: CountingBody | None = None, length: int | None = None, error=None):
        self.body, self.length, self.error = body, length, error

    def get_object(self, Bucket: str, Key: str) -> dict:
        if self.error is not None:
            raise self.error
        resp = {"Body": self.body}
        if self.length is not None:
            resp["ContentLength"] = self.length
        return resp


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_s3_stream_without_length_reads_at_most_limit_plus_one() -> None:
    body = CountingBody(50 * 1024 * 1024)
    fetcher = MediaFetcher(s3_client=FakeS3(body, length=None))
    with pytest.raises(MediaTooLarge):
        fetcher.get_bytes("s3://media/huge.bin", max_bytes=3 * 1024 * 1024)
    assert body.read_total == 3 * 1024 * 1024 + 1
    assert body.closed


def test_s3_content_length_refused_before_reading() -> None:
    body = CountingBody(5000)
    with pytest.raises(MediaTooLarge):
        MediaFetcher(s3_client=FakeS3(body, length=5000)).get_bytes("s3://media/a", max_bytes=10)
    assert body.read_total == 0 and body.closed


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchKey", 404, MediaNotFound),
        ("NoSuchBucket", 404, MediaNotFound),
        ("AccessDenied", 403, ForbiddenMedia),
        ("SlowDown", 503, StorageUnavailable),
        ("InternalError", 500, StorageUnavailable),
        ("Throttling", 400, StorageUnavailable),
        ("InvalidArgument", 400, StorageError),
    ],
)
def test_s3_error_codes_are_typed(code: str, status: int, expected: type) -> None:
    fetcher = MediaFetcher(s3_client=FakeS3(error=_client_error(code, status)))
    with pytest.raises(expected) as info:
        fetcher.get_bytes("s3://media/a.jpg", max_bytes=10)
    if expected is StorageError:
        assert type(info.value) is StorageError  # permanent, not mistaken for transient


def test_delete_removes_and_tolerates_missing(store: FileStore) -> None:
    store.put_json("results/x.json", {"a": 1})
    assert store.exists("results/x.json")
    store.delete("results/x.json")
    assert not store.exists("results/x.json")
    store.delete("results/x.json")  # already gone: not an error
