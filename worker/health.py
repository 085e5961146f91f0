"""What the probes read, and the HTTP server that serves /healthz /readyz /metrics.

`Health` is the state liveness and readiness are judged from;
`ObservabilityServer` serves it, and a `Metrics` registry, over plain HTTP.
"""

from __future__ import annotations

import json as jsonlib
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.metrics import Metrics


class Health:
    """What the probes read. Liveness asks "is the batch thread stuck?";
    readiness asks "should this pod get work?" (loaded, warmed up, broker up, not draining)."""

    def __init__(
        self,
        *,
        broker_ok_fn: Callable[[], bool] | None = None,
        pending_fn: Callable[[], int] | None = None,
        batch_stuck_after_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker_ok_fn = broker_ok_fn
        self.pending_fn = pending_fn
        self.batch_stuck_after_s = batch_stuck_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._model_ready = False
        self._warmed_up = False
        self._draining = False
        self._last_beat: float | None = None
        self._ready_since: float | None = None

    def _set(self, name: str, value: bool) -> None:
        with self._lock:
            setattr(self, name, bool(value))
            if self._model_ready and self._ready_since is None:
                self._ready_since = self._clock()

    model_ready = property(lambda self: self._model_ready, lambda self, v: self._set("_model_ready", v))
    warmed_up = property(lambda self: self._warmed_up, lambda self, v: self._set("_warmed_up", v))
    draining = property(lambda self: self._draining, lambda self, v: self._set("_draining", v))

    def batch_heartbeat(self) -> None:
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def live(self) -> tuple[bool, str]:
        with self._lock:
            # Before the first beat, count from when the model became ready:
            # a batch thread that never starts is as stuck as one that stopped.
            since = self._last_beat if self._last_beat is not None else self._ready_since
        if since is None or self.pending_fn is None:
            return True, "ok"
        age = self._clock() - since
        if age <= self.batch_stuck_after_s:
            return True, "ok"
        try:
            pending = self.pending_fn()
        except Exception as exc:  # a broken gauge must not get the pod killed
            return True, f"ok (pending unknown: {type(exc).__name__})"
        if pending:
            return False, f"batch thread silent for {age:.0f}s with {pending} pending"
        return True, "ok (idle)"

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            model_ready, warmed_up, draining = self._model_ready, self._warmed_up, self._draining
        if draining:
            return False, "draining"
        if not model_ready:
            return False, "model not loaded"
        if not warmed_up:
            return False, "model not warmed up"
        if self.broker_ok_fn is not None:
            try:
                broker_ok = bool(self.broker_ok_fn())
            except Exception as exc:
                return False, f"broker check failed: {type(exc).__name__}"
            if not broker_ok:
                return False, "broker unreachable"
        return True, "ok"


class ObservabilityServer:
    """/healthz, /readyz and /metrics on a small threaded HTTP server (daemon thread)."""

    def __init__(self, port: int, metrics: Metrics, health: Health, host: str = "0.0.0.0") -> None:
        self.metrics = metrics
        self.health = health
        self._requested = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        metrics, health = self.metrics, self.health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, reason = health.live() if path == "/healthz" else health.ready()
                    body = jsonlib.dumps({"ok": ok, "reason": reason}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"ok": false, "reason": "not found"}', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the job logs

        return Handler

    def start(self) -> ObservabilityServer:
        server = ThreadingHTTPServer(self._requested, self._handler())
        server.daemon_threads = True
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ivq-observability", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ObservabilityServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
