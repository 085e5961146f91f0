"""What operators see: JSON logs, Prometheus metrics, and /healthz /readyz /metrics.

Logs are structlog JSON lines with the bound context (job_id, batch_id,
attempt, worker) and a redaction step, so secrets and presigned URLs never
reach the log pipeline. `Metrics` owns its own registry, so several can live
in one process (tests, a worker and its callback pool). `Health` is the
state the probes read; `ObservabilityServer` serves it over plain HTTP.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# ---------------------------------------------------------------- logging

REDACTED = "[REDACTED]"
_SECRET_KEY_RE = re.compile(
    r"secret|passw|signature|authorization|api[_-]?key|credential|cookie"
    r"|(^|_)(access|auth|bearer|refresh|session|security|id)?_?token$",  # not "completion_tokens"
    re.I,
)
# A URL whose query carries a signature (S3/GCS presigned, Azure SAS): drop the whole query.
_SIGNED_URL_RE = re.compile(
    r"""(?P<base>[a-z][a-z0-9+.-]*://[^\s?#"'<>]+)\?(?P<query>[^\s"'<>]*)""", re.I
)
_SIGNED_QUERY_RE = re.compile(
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|(^|&)sig=|(^|&)signature=",
    re.I,
)
_URL_PASSWORD_RE = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@", re.I)


def redact_text(text: str) -> str:
    """Strip signed query strings and URL passwords from free text."""

    def _strip(match: re.Match) -> str:
        if _SIGNED_QUERY_RE.search(match.group("query")):
            return match.group("base")
        return match.group(0)

    if "://" not in text:
        return text
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    return _SIGNED_URL_RE.sub(_strip, text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth > 6:  # a deeply nested value is not worth walking; it is still shown
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY_RE.search(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v, depth + 1) for v in value)
    return value


def redact_processor(logger: Any, method_name: str, event_dict: dict) -> dict:
    """structlog processor: secret-named keys are masked, signed URLs lose their query."""
    return _redact_value(event_dict)


def configure_logging(
    level: str = "INFO", *, json: bool = True, stream: TextIO | None = None, static: dict[str, Any] | None = None
) -> None:
    """JSON lines to stdout (or `stream`); stdlib loggers (celery, botocore) go the same way.

    `static` fields (e.g. worker=...) go on every line: contextvars do not
    reach threads started later (task threads, the model thread), these do.
    """
    level_no = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}")
    stream = stream or sys.stdout
    fixed = dict(static or {})

    def add_static(logger: Any, method_name: str, event_dict: dict) -> dict:
        for key, value in fixed.items():
            event_dict.setdefault(key, value)
        return event_dict

    shared: list = [
        structlog.contextvars.merge_contextvars,
        add_static,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    tail = [structlog.processors.format_exc_info, redact_processor]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_no)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(level_no, logging.WARNING))


# ---------------------------------------------------------------- metrics

# From a tiny CPU model's milliseconds to a large GPU batch's minutes.
_TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600,
)  # fmt: skip
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_COST_BUCKETS = tuple(float(4**i) for i in range(11))  # 1 .. ~1M (tokens, tiles, frames...)


class Metrics:
    """The worker's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("ivq_jobs", "Jobs finished, by final state and error code", ["state", "code"], registry=r)
        self.queue_wait = Histogram(
            "ivq_queue_wait_seconds", "Enqueue to claim", buckets=_QUEUE_BUCKETS, registry=r
        )
        self.preprocess = Histogram(
            "ivq_preprocess_seconds", "Media fetch + decode + prompt build per job", buckets=_TIME_BUCKETS, registry=r
        )
        self.batch_wait = Histogram(
            "ivq_batch_wait_seconds", "Submit to the batcher until its batch starts", buckets=_BATCH_WAIT_BUCKETS, registry=r
        )
        self.generate = Histogram(
            "ivq_generate_seconds", "One generate_batch call", buckets=_TIME_BUCKETS, registry=r
        )
        self.batch_size = Histogram("ivq_batch_size", "Largest running batch a job decoded in (static: jobs per generate)",
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_cost = Histogram("ivq_batch_cost", "Cost units per generate call", buckets=_COST_BUCKETS, registry=r)
        self.tokens = Counter("ivq_tokens_generated", "New tokens generated", registry=r)
        self.in_flight = Gauge("ivq_jobs_in_flight", "Jobs held by task threads now", registry=r)
        self.gpu_memory = Gauge(
            "ivq_gpu_memory_bytes", "CUDA memory of this process", ["device", "kind"], registry=r
        )
        self.model_load = Gauge("ivq_model_load_seconds", "Model load + warm-up time at start", registry=r)
        self.callbacks = Counter("ivq_callbacks", "Webhook delivery attempts, by outcome", ["outcome"], registry=r)
        self.retries = Counter("ivq_job_retries", "Jobs sent back to the queue, by error code", ["code"], registry=r)
        self.info = Info("ivq_worker", "Static facts about this worker", registry=r)

    # Small helpers, so call sites stay one line.
    def job_finished(self, state: str, code: str | None = None) -> None:
        self.jobs.labels(state=str(state), code=str(code or "none")).inc()

    def job_retried(self, code: str) -> None:
        self.retries.labels(code=str(code)).inc()

    def observe_job(
        self,
        *,
        queue_wait_s: float | None = None,
        preprocess_s: float | None = None,
        batch_wait_s: float | None = None,
    ) -> None:
        for hist, value in (
            (self.queue_wait, queue_wait_s),
            (self.preprocess, preprocess_s),
            (self.batch_wait, batch_wait_s),
        ):
            if value is not None:
                hist.observe(max(0.0, value))

    def observe_batch(self, size: int, cost: float, generate_s: float, tokens_generated: int = 0) -> None:
        self.batch_size.observe(size)
        self.batch_cost.observe(cost)
        self.generate.observe(generate_s)
        if tokens_generated:
            self.tokens.inc(tokens_generated)

    def callback_attempt(self, outcome: str) -> None:
        self.callbacks.labels(outcome=str(outcome)).inc()

    def model_loaded(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def set_info(self, **facts: str) -> None:
        self.info.info({k: str(v) for k, v in facts.items()})

    @contextmanager
    def track_in_flight(self) -> Iterator[None]:
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    def refresh_gpu_memory(self) -> None:
        # Only look at torch if the process already imported it: the callback
        # worker and the tests must not pay for importing torch here.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            self.gpu_memory.labels(device=device, kind="allocated").set(torch.cuda.memory_allocated(index))
            self.gpu_memory.labels(device=device, kind="reserved").set(torch.cuda.memory_reserved(index))
            self.gpu_memory.labels(device=device, kind="max_allocated").set(torch.cuda.max_memory_allocated(index))

    def render(self) -> bytes:
        self.refresh_gpu_memory()
        return generate_latest(self.registry)


# ---------------------------------------------------------------- health


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


# ---------------------------------------------------------------- HTTP


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
