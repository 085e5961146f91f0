"""Worker subprocesses for the fault tests, and a supervisor that restarts them.

A `WorkerProc` is one `python -m worker.cli worker` child with its own IVQ_*
environment and log file. It is ready when its heartbeat is in the Redis hash
`ivq:workers` (written after the model is loaded and warmed up). `Supervisor`
plays Kubernetes: when the worker process exits, it starts a new one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import redis

from api_client import keys
from api_client.redis_conn import sync_client

REPO_ROOT = Path(__file__).resolve().parents[2]
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def worker_env(
    *, redis_url: str, data_dir: Path, model_cache_dir: Path, store_url: str | None = None,
    s3_endpoint_url: str | None = None, **ivq: object,
) -> dict[str, str]:
    """Environment for one worker: the parent's PATH etc., AWS test creds, IVQ_* settings.

    Extra keyword arguments become IVQ_<NAME> (e.g. lease_s=3 -> IVQ_LEASE_S=3).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVQ_")}
    env.update(AWS_TEST_ENV)
    env.update({
        "PYTHONUNBUFFERED": "1", "IVQ_REDIS_URL": redis_url, "IVQ_MODEL": "tiny",
        "IVQ_MODEL_CACHE_DIR": str(model_cache_dir), "IVQ_DATA_DIR": str(data_dir), "IVQ_LOG_LEVEL": "INFO",
    })
    if store_url:
        env["IVQ_STORE_URL"] = store_url
    if s3_endpoint_url:
        env["IVQ_S3_ENDPOINT_URL"] = s3_endpoint_url
    if "visibility_timeout_s" in ivq and "job_timeout_s" not in ivq:
        # Settings requires the visibility timeout to outlast the longest job.
        ivq["job_timeout_s"] = max(1, int(ivq["visibility_timeout_s"]) // 2)
    for name, value in ivq.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        env[f"IVQ_{name.upper()}"] = str(value)
    return env


WORKER_COMMAND = ("-m", "worker.cli", "worker")


class WorkerProc:
    """One worker process. `worker_id` must be unique per start (it keys the heartbeat).

    `command` (python arguments) defaults to the real `internvl-queue worker`; a test
    that needs a fault runs its own entry point around it (tests/faults/crashing_worker.py)."""

    def __init__(self, env: dict[str, str], log_dir: Path, worker_id: str,
                 command: tuple[str, ...] = WORKER_COMMAND):
        self.command = command
        self.env = {**env, "IVQ_WORKER_ID": worker_id}
        self.worker_id = worker_id
        self.log_path = Path(log_dir) / f"{worker_id}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> WorkerProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.command], env=self.env, cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, redis_url: str, timeout: float = 120.0) -> float:
        """Block until the heartbeat appears; returns seconds since start."""
        r = sync_client(redis_url, socket_timeout=5, retries=0)  # redis:// or redis+sentinel://
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"worker {self.worker_id} exited with {self.returncode}:\n{self.tail()}")
                try:
                    if r.hexists(keys.WORKERS, self.worker_id):
                        return time.monotonic() - self.started_at
                except redis.ConnectionError:
                    pass
                time.sleep(0.1)
            raise TimeoutError(f"worker {self.worker_id} not ready after {timeout}s:\n{self.tail()}")
        finally:
            r.close()

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def kill(self) -> None:
        """SIGKILL: a crash, an OOM kill, a node gone."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 120.0) -> float:
        """SIGTERM (what Kubernetes sends first); returns seconds until the process exited."""
        t0 = time.monotonic()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        """Test cleanup: SIGTERM, then SIGKILL if it lingers."""
        if not self.alive():
            return
        try:
            self.terminate(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class Supervisor:
    """Keeps one worker running: when it exits (for any reason), start a new one."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str, redis_url: str,
                 command: tuple[str, ...] = WORKER_COMMAND):
        self.env, self.log_dir, self.name, self.redis_url = env, log_dir, name, redis_url
        self.command = command
        self.generation = 0
        self.exits: list[int] = []  # return codes of the workers that died
        self.current: WorkerProc | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"supervisor-{name}", daemon=True)

    def _spawn(self) -> WorkerProc:
        self.generation += 1
        proc = WorkerProc(self.env, self.log_dir, f"{self.name}-{self.generation}", self.command).start()
        with self._lock:
            self.current = proc
        return proc

    def start(self) -> Supervisor:
        self._spawn().wait_ready(self.redis_url)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            proc = self.current
            if proc is not None and not proc.alive() and not self._stop.is_set():
                self.exits.append(proc.returncode)
                self._spawn()
            self._stop.wait(0.2)

    @property
    def restarts(self) -> int:
        return self.generation - 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            proc = self.current
        if proc is not None:
            proc.stop()
