"""What the probes read, and the HTTP server that serves /healthz /readyz /metrics.

`Health` holds the worker's `WorkerState` (starting, ready, draining,
stopped) and whether it has a model; liveness and readiness are judged from
those. `ObservabilityServer` serves them, and a `Metrics` registry, over
plain HTTP: each probe answers {"ok", "reason", "state", "has_model"}.
"""

from __future__ import annotations

import json as jsonlib
import threading
import time
from collections.abc import Callable
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.ops.metrics import Metrics


class WorkerState(Enum):
    """Where a worker is in its life; readiness is read from this, not from loose flags.

    STARTING -> READY -> DRAINING -> STOPPED. A worker may also go from
    STARTING straight to DRAINING (SIGTERM during the model load), and from
    any state to STOPPED; it never goes back.
    """

    STARTING = "starting"  # connecting to the broker, loading and warming up the model
    READY = "ready"  # taking work
    DRAINING = "draining"  # SIGTERM: finishing what the engine admitted, taking nothing new
    STOPPED = "stopped"  # shut down; the process is about to exit


_NEXT: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


class Health:
    """What the probes read. Liveness asks "is the batch thread stuck?";
    readiness asks "should this pod get work?" (state READY and the broker up).

    `has_model` says whether this worker loaded a model at all: a
    callbacks-only worker is READY without one, and never reports
    `model_ready` or `warmed_up`.
    """

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
        self._state = WorkerState.STARTING
        self._has_model = False
        self._warmed_up = False
        self._last_beat: float | None = None
        self._ready_since: float | None = None

    # ---- transitions (the runtime calls these) ----------------------------
    def _move(self, to: WorkerState) -> None:
        if to in _NEXT[self._state]:  # never backwards: a READY after a DRAINING is ignored
            self._state = to

    def mark_ready(self, *, has_model: bool, warmed_up: bool = True) -> None:
        """Start finished: the model (if any) is loaded, and warmed up if `warmed_up`."""
        with self._lock:
            self._has_model = bool(has_model)
            self._warmed_up = self._has_model and bool(warmed_up)
            if self._has_model and self._ready_since is None:
                self._ready_since = self._clock()
            self._move(WorkerState.READY)

    def mark_draining(self) -> None:
        with self._lock:
            self._move(WorkerState.DRAINING)

    def mark_stopped(self) -> None:
        with self._lock:
            self._move(WorkerState.STOPPED)

    # ---- facts -------------------------------------------------------------
    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def has_model(self) -> bool:
        return self._has_model

    @property
    def model_ready(self) -> bool:
        """A model is loaded and serving (or finishing its work while draining)."""
        with self._lock:
            return self._has_model and self._state in (WorkerState.READY, WorkerState.DRAINING)

    @property
    def warmed_up(self) -> bool:
        return self.model_ready and self._warmed_up

    def facts(self) -> dict[str, str | bool]:
        """What the probe responses carry besides ok and reason."""
        with self._lock:
            return {"state": self._state.value, "has_model": self._has_model}

    def batch_heartbeat(self) -> None:
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def live(self) -> tuple[bool, str]:
        with self._lock:
            # Before the first beat, count from when the model became ready:
            # a batch thread that never starts is as stuck as one that stopped.
            # A worker without a model has no batch thread: nothing to judge.
            since = self._last_beat if self._last_beat is not None else self._ready_since
        if since is None or self.pending_fn is None:
            return True, "ok"
        age = self._clock() - since
        if age <= self.batch_stuck_after_s:
            return True, "ok"
        try:
            pending = self.pending_fn()
        except Exception as exc:  # noqa: BLE001 - a broken gauge must not get the pod killed
            return True, f"ok (pending unknown: {type(exc).__name__})"
        if pending:
            return False, f"batch thread silent for {age:.0f}s with {pending} pending"
        return True, "ok (idle)"

    def ready(self) -> tuple[bool, str]:
        state = self.state
        if state is not WorkerState.READY:
            return False, state.value
        if self.broker_ok_fn is not None:
            try:
                broker_ok = bool(self.broker_ok_fn())
            except Exception as exc:  # noqa: BLE001 - any failure of the check means "not ready"
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
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, reason = health.live() if path == "/healthz" else health.ready()
                    body = jsonlib.dumps({"ok": ok, "reason": reason, **health.facts()}).encode()
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
