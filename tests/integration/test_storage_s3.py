"""S3Store and s3:// media against moto's S3 server over HTTP; the embedded Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from botocore.config import Config
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.services import MotoS3, s3_client, start_redis
from worker.ops.embedded import EmbeddedRedis, free_port
from worker.io.media_fetch import ForbiddenMedia, MediaNotFound, MediaTooLarge, StorageUnavailable
from worker.io.results_store import FileStore, S3Store, open_store

RESULTS = "ivq-results"
MEDIA = "ivq-media"
OTHER = "other-bucket"


@pytest.fixture(scope="module")
def moto_s3():
    server = MotoS3()
    client = server.client()
    for bucket in (RESULTS, MEDIA, OTHER):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=MEDIA, Key="img/cat.jpg", Body=b"\xff\xd8cat")
    client.put_object(Bucket=MEDIA, Key="big.bin", Body=b"x" * 5000)
    client.put_object(Bucket=OTHER, Key="x.jpg", Body=b"other")
    yield server
    server.stop()


@pytest.fixture
def store(moto_s3: MotoS3) -> S3Store:
    s = open_store(
        f"s3://{RESULTS}/prod/v1/",
        s3_client=moto_s3.client(),
        s3_allowed_buckets=(MEDIA, RESULTS),
    )
    assert isinstance(s, S3Store)
    return s


def test_put_get_json_round_trip(store: S3Store, moto_s3: MotoS3) -> None:
    obj = {"job_id": "j1", "output": "ünïcode", "usage": {"completion_tokens": 7}}
    url = store.put_json("results/j1.json", obj)
    assert url == f"s3://{RESULTS}/prod/v1/results/j1.json"
    assert store.exists("results/j1.json")
    assert not store.exists("results/missing.json")
    assert store.get_json("results/j1.json") == obj
    head = moto_s3.client().head_object(Bucket=RESULTS, Key="prod/v1/results/j1.json")
    assert head["ContentType"] == "application/json"
    # the result URL is readable as media through the same store
    assert b"\xc3\xbcn" in store.fetcher.get_bytes(url, max_bytes=10_000)


def test_get_bytes_s3_media(store: S3Store) -> None:
    assert store.fetcher.get_bytes(f"s3://{MEDIA}/img/cat.jpg", max_bytes=100) == b"\xff\xd8cat"


def test_missing_key_and_bucket_are_not_found(store: S3Store) -> None:
    with pytest.raises(MediaNotFound):
        store.fetcher.get_bytes(f"s3://{MEDIA}/img/dog.jpg", max_bytes=100)
    with pytest.raises(MediaNotFound):
        store.get_json("results/never-written.json")
    unrestricted = open_store(f"s3://{RESULTS}", s3_client=store.client)
    with pytest.raises(MediaNotFound):
        unrestricted.fetcher.get_bytes("s3://no-such-bucket-here/a.jpg", max_bytes=100)


def test_oversize_is_too_large(store: S3Store) -> None:
    with pytest.raises(MediaTooLarge):
        store.fetcher.get_bytes(f"s3://{MEDIA}/big.bin", max_bytes=4999)
    assert len(store.fetcher.get_bytes(f"s3://{MEDIA}/big.bin", max_bytes=5000)) == 5000


def test_bucket_allow_list(store: S3Store) -> None:
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes(f"s3://{OTHER}/x.jpg", max_bytes=100)
    with pytest.raises(ForbiddenMedia):
        store.fetcher.get_bytes(f"s3://{MEDIA}/img/../../etc/passwd", max_bytes=100)
    unrestricted = open_store(f"s3://{RESULTS}", s3_client=store.client)
    assert unrestricted.fetcher.get_bytes(f"s3://{OTHER}/x.jpg", max_bytes=100) == b"other"


def test_file_store_reads_s3_media(tmp_path: Path, moto_s3: MotoS3) -> None:
    fs = open_store(tmp_path.as_uri(), allowed_file_root=tmp_path, s3_client=moto_s3.client())
    assert isinstance(fs, FileStore)
    assert fs.fetcher.get_bytes(f"s3://{MEDIA}/img/cat.jpg", max_bytes=100) == b"\xff\xd8cat"


def test_shared_client_from_many_threads(store: S3Store) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            store.put_json(f"results/t{i}.json", {"i": i})
            assert store.get_json(f"results/t{i}.json") == {"i": i}
        except BaseException as exc:  # noqa: BLE001 - collected: a thread's assert does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_unreachable_endpoint_is_unavailable() -> None:
    port = free_port()  # nobody listens here
    fast = Config(connect_timeout=0.5, read_timeout=0.5, retries={"max_attempts": 1, "mode": "standard"})
    client = s3_client(f"http://127.0.0.1:{port}", boto_config=fast)
    store = open_store(f"s3://{RESULTS}/p", s3_client=client)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.fetcher.get_bytes(f"s3://{MEDIA}/img/cat.jpg", max_bytes=100)
    with pytest.raises(StorageUnavailable):
        store.put_json("results/x.json", {"a": 1})
    with pytest.raises(StorageUnavailable):
        store.exists("results/x.json")
    assert time.monotonic() - started < 10


def test_stopped_server_is_unavailable() -> None:
    server = MotoS3()
    fast = Config(connect_timeout=0.5, read_timeout=0.5, retries={"max_attempts": 1, "mode": "standard"})
    client = server.client(fast)
    client.create_bucket(Bucket="short-lived")
    store = open_store("s3://short-lived/p", s3_client=client)
    store.put_json("a.json", {"a": 1})
    server.stop()
    with pytest.raises(StorageUnavailable):
        store.get_json("a.json")


def test_embedded_redis_ping_and_appendonly_restart(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis", appendonly=True) as server:
        conn = redis.Redis.from_url(server.url)
        assert conn.ping()
        conn.set("ivq:test", "kept")
        pid, port = server.pid, server.port
        server.restart()
        assert server.pid != pid and server.port == port
        conn = redis.Redis.from_url(server.url)
        assert conn.get("ivq:test") == b"kept"
        assert conn.config_get("bind")["bind"] == "127.0.0.1"
    assert not server.running()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)).ping()


def test_embedded_redis_without_appendonly_forgets(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "r2") as server:
        conn = redis.Redis.from_url(server.url)
        conn.set("k", "v")
        server.restart()
        assert redis.Redis.from_url(server.url).get("k") is None
        assert redis.Redis.from_url(server.url).config_get("save")["save"] == ""


def test_embedded_redis_password(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "r3", password="s3cret/+") as server:
        assert "s3cret" in server.url
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            # no retries: redis-py would otherwise back off for seconds before giving up
            redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0)).ping()


def test_embedded_redis_dies_with_its_parent(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from worker.ops.embedded import EmbeddedRedis; "
        "r = EmbeddedRedis(Path(sys.argv[1])); print(r.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r4")], stdout=subprocess.PIPE)
    child_pid = int(parent.stdout.readline())
    os.kill(child_pid, 0)  # alive while the parent lives
    parent.kill()  # SIGKILL: no atexit, no cleanup code runs
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.05)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_delete_removes_the_object(store: S3Store) -> None:
    store.put_json("results/gone.json", {"a": 1})
    assert store.exists("results/gone.json")
    store.delete("results/gone.json")
    assert not store.exists("results/gone.json")
    store.delete("results/gone.json")  # S3 deletes are idempotent
