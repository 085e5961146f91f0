"""Session-wide real services: one redis-server and one S3 (moto) server over HTTP.

Both listen on 127.0.0.1 only. Tests that restart or kill services start
their own (tests/faults). Each test gets a clean Redis database.
"""

from __future__ import annotations

import os

import pytest

import importlib.util as _ilu

pytest_plugins = ["tests.model_fixtures"] if _ilu.find_spec("tests.model_fixtures") else []

# boto3 in this process (and in worker subprocesses, which inherit it) talks
# only to the local moto server; these are its dummy credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from tests.services import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_server():
    from tests.services import MotoS3

    server = MotoS3()
    yield server
    server.stop()
