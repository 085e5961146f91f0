"""Real services for tests: a redis-server child process and moto's S3 over HTTP.

Nothing here depends on the machine's AWS configuration: the S3 client gets
explicit dummy credentials, and both services listen on 127.0.0.1 only.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from botocore.config import Config

from worker.ops.embedded import EmbeddedRedis, free_port
from worker.io.media_fetch import make_s3_client

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


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    import socket

    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class _ClusterNode(EmbeddedRedis):
    def _argv(self) -> list[str]:
        conf = str(self.data_dir / "nodes.conf")
        return super()._argv() + ["--cluster-enabled", "yes", "--cluster-config-file", conf,
                                  "--cluster-node-timeout", "2000"]


class RedisClusterServers:
    """A real Redis Cluster: `nodes` redis-servers in cluster mode on loopback, the 16384 slots
    split between them, no replicas. `client()` is a redis-py RedisCluster."""

    def __init__(self, tmp_dir: Path, nodes: int = 3) -> None:
        import time

        import redis

        # Each node starts as it is built.
        self.nodes = [_ClusterNode(Path(tmp_dir) / f"node{i}", port=_cluster_port()) for i in range(nodes)]
        conns = [redis.Redis(host="127.0.0.1", port=node.port) for node in self.nodes]
        per = 16384 // nodes
        for i, conn in enumerate(conns):
            last = 16383 if i == nodes - 1 else (i + 1) * per - 1
            conn.execute_command("CLUSTER ADDSLOTS", *range(i * per, last + 1))
        for conn in conns[1:]:
            conn.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        deadline = time.monotonic() + 30
        while not all(c.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                      and len(c.execute_command("CLUSTER NODES")) == nodes for c in conns):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not converge")
            time.sleep(0.1)
        for conn in conns:
            conn.close()

    def client(self):
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
