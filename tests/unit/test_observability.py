"""Logs (redaction, bound context), metrics, health probes and their HTTP server."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import structlog

from worker.observability import (
    REDACTED,
    Health,
    Metrics,
    ObservabilityServer,
    configure_logging,
    redact_processor,
    redact_text,
)

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/img/cat.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=deadbeef"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["Content-Type"]


@pytest.fixture
def served():
    state = {"broker_ok": True, "pending": 0}
    clock = FakeClock()
    health = Health(
        broker_ok_fn=lambda: state["broker_ok"],
        pending_fn=lambda: state["pending"],
        batch_stuck_after_s=60,
        clock=clock,
    )
    metrics = Metrics()
    server = ObservabilityServer(0, metrics, health, host="127.0.0.1").start()
    yield server, health, metrics, state, clock, f"http://127.0.0.1:{server.port}"
    server.stop()


def test_server_reports_real_port_and_probes(served) -> None:
    server, health, _, state, _, base = served
    assert server.port > 0

    status, body, ctype = get(base + "/readyz")
    assert (status, json.loads(body)) == (503, {"ok": False, "reason": "model not loaded"})
    assert ctype == "application/json"

    health.model_ready = True
    assert json.loads(get(base + "/readyz")[1])["reason"] == "model not warmed up"
    health.warmed_up = True
    assert get(base + "/readyz")[:2] == (200, b'{"ok": true, "reason": "ok"}')

    state["broker_ok"] = False
    status, body, _ = get(base + "/readyz")
    assert (status, json.loads(body)["reason"]) == (503, "broker unreachable")
    state["broker_ok"] = True
    health.draining = True
    status, body, _ = get(base + "/readyz")
    assert (status, json.loads(body)["reason"]) == (503, "draining")

    assert get(base + "/healthz")[0] == 200
    assert get(base + "/nope")[0] == 404


def test_liveness_flips_when_heartbeat_is_stale_with_pending_work(served) -> None:
    _, health, _, state, clock, base = served
    assert get(base + "/healthz")[0] == 200  # not started yet: nothing to judge

    health.model_ready = True
    health.batch_heartbeat()
    clock.now += 61
    assert health.live()[0] is True  # stale, but idle: a quiet worker is not a stuck one
    state["pending"] = 3
    status, body, _ = get(base + "/healthz")
    assert status == 503
    assert "3 pending" in json.loads(body)["reason"]

    health.batch_heartbeat()
    assert get(base + "/healthz")[0] == 200


def test_liveness_counts_from_ready_when_batch_thread_never_beats() -> None:
    clock = FakeClock()
    health = Health(pending_fn=lambda: 1, batch_stuck_after_s=10, clock=clock)
    clock.now += 100
    assert health.live()[0] is True  # model still loading
    health.model_ready = True
    clock.now += 11
    assert health.live()[0] is False


def test_broken_probe_functions_do_not_crash() -> None:
    def boom():
        raise ConnectionError("redis down")

    clock = FakeClock()
    health = Health(broker_ok_fn=boom, pending_fn=boom, batch_stuck_after_s=0, clock=clock)
    health.model_ready = health.warmed_up = True
    health.batch_heartbeat()
    ok, reason = health.ready()
    assert not ok and "ConnectionError" in reason
    clock.now += 1000
    assert health.live()[0] is True


def test_metrics_text_after_calls(served) -> None:
    _, _, metrics, _, _, base = served
    metrics.job_finished("succeeded")
    metrics.job_finished("failed", "media_not_found")
    metrics.job_retried("timeout")
    metrics.observe_job(queue_wait_s=0.5, preprocess_s=0.02, batch_wait_s=0.004)
    metrics.observe_batch(size=4, cost=1200, generate_s=0.8, tokens_generated=64)
    metrics.callback_attempt("delivered")
    metrics.model_loaded(12.5)
    metrics.set_info(model="tiny", worker_id="w1")
    with metrics.track_in_flight():
        assert metrics.registry.get_sample_value("ivq_jobs_in_flight") == 1
    status, body, ctype = get(base + "/metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain")
    for line in (
        'ivq_jobs_total{code="none",state="succeeded"} 1.0',
        'ivq_jobs_total{code="media_not_found",state="failed"} 1.0',
        'ivq_job_retries_total{code="timeout"} 1.0',
        "ivq_queue_wait_seconds_count 1.0",
        "ivq_preprocess_seconds_sum 0.02",
        "ivq_batch_wait_seconds_count 1.0",
        'ivq_batch_size_bucket{le="4.0"} 1.0',
        "ivq_batch_cost_sum 1200.0",
        "ivq_generate_seconds_count 1.0",
        "ivq_tokens_generated_total 64.0",
        "ivq_jobs_in_flight 0.0",
        'ivq_callbacks_total{outcome="delivered"} 1.0',
        "ivq_model_load_seconds 12.5",
        'ivq_worker_info{model="tiny",worker_id="w1"} 1.0',
    ):
        assert line in text, line


def test_metrics_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.job_finished("succeeded")
    assert b"ivq_jobs_total{" not in b.render()
    assert b'ivq_jobs_total{code="none",state="succeeded"} 1.0' in a.render()


def test_rendering_metrics_does_not_import_torch() -> None:
    code = (
        "import sys; from worker.observability import Metrics; Metrics().render(); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_redaction_processor() -> None:
    event = {
        "event": f"fetched {PRESIGNED} ok",
        "url": PRESIGNED,
        "webhook_secret": "whsec_abc",
        "Authorization": "Bearer xyz",
        "headers": {"x-api-key": "k", "webhook-signature": "v1,abc", "accept": "json"},
        "redis_url": "redis://:hunter2@10.0.0.5:6379/0",
        "plain": "https://example.com/a?page=2",
        "items": [{"password": "p"}, "s3://bucket/key.jpg"],
        "job_id": "j1",
    }
    out = redact_processor(None, "info", event)
    dumped = json.dumps(out)
    for secret in ("deadbeef", "AKIA", "whsec_abc", "xyz", "hunter2", '"k"', "v1,abc", '"p"'):
        assert secret not in dumped, secret
    assert out["url"] == "https://bucket.s3.amazonaws.com/img/cat.jpg"
    assert out["event"] == "fetched https://bucket.s3.amazonaws.com/img/cat.jpg ok"
    assert out["webhook_secret"] == REDACTED and out["headers"]["accept"] == "json"
    assert out["redis_url"] == f"redis://:{REDACTED}@10.0.0.5:6379/0"
    assert out["plain"] == "https://example.com/a?page=2"  # unsigned queries stay
    assert out["items"][1] == "s3://bucket/key.jpg" and out["job_id"] == "j1"
    assert redact_text("https://x.blob.core.windows.net/c/b?sv=2022&sig=abc") == "https://x.blob.core.windows.net/c/b"


@pytest.fixture
def log_stream():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:], level = saved
    root.setLevel(level)


def test_configure_logging_emits_json_with_context_and_redaction(log_stream) -> None:
    configure_logging("INFO", stream=log_stream)
    log = structlog.get_logger("worker.test")
    with structlog.contextvars.bound_contextvars(job_id="j42", batch_id="b7", attempt=2, worker="w1"):
        log.info("media_fetched", url=PRESIGNED, token="t0ps3cret")
        log.debug("hidden")
    logging.getLogger("celery.worker").warning("stdlib says %s", PRESIGNED)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("job_failed")

    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "media_fetched",
        "stdlib says https://bucket.s3.amazonaws.com/img/cat.jpg",
        "job_failed",
    ]
    first = lines[0]
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert (first["job_id"], first["batch_id"], first["attempt"], first["worker"]) == ("j42", "b7", 2, "w1")
    assert first["token"] == REDACTED and "X-Amz" not in first["url"]
    assert lines[1]["level"] == "warning" and lines[1]["logger"] == "celery.worker"
    assert "RuntimeError: boom" in lines[2]["exception"]
    assert "deadbeef" not in log_stream.getvalue()


def test_configure_logging_rejects_unknown_level(log_stream) -> None:
    with pytest.raises(ValueError):
        configure_logging("LOUD", stream=log_stream)
