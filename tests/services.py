"""Real services for tests: a redis-server child process and moto's S3 over HTTP.

Nothing here depends on the machine's AWS configuration: the S3 client gets
explicit dummy credentials, and both services listen on 127.0.0.1 only.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from botocore.config import Config

from worker.embedded import EmbeddedRedis
from worker.media_fetch import make_s3_client

TEST_CREDENTIALS = {
    "aws_access_key_id": "test",
    "aws_secret_access_key": "test",
    "region_name": "us-east-1",
}


def start_redis(tmp_dir: Path, appendonly: bool = False, password: str | None = None) -> EmbeddedRedis:
    return EmbeddedRedis(Path(tmp_dir), appendonly=appendonly, password=password)


def s3_client(endpoint_url: str, boto_config: Config | None = None):
    """A boto3 S3 client for a test endpoint, with dummy credentials."""
    return make_s3_client(endpoint_url, boto_config=boto_config, **TEST_CREDENTIALS)


class MotoS3:
    """moto's S3 server on an ephemeral loopback port (a real HTTP endpoint).

    moto keeps its state per process, so two servers in one process share
    buckets; `reset()` empties everything.
    """

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # only the tests need moto

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"

    def client(self, boto_config: Config | None = None):
        # Note for presigned PUTs against moto: send an explicit Content-Type,
        # or moto stores an empty object.
        return s3_client(self.endpoint_url, boto_config)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> MotoS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
