"""Logs: redaction of secrets and signed URLs, JSON lines with the bound context."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable

import pytest
import structlog

from worker.ops.logs import REDACTED, configure_logging, redact_processor, redact_text

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/img/cat.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=deadbeef"
)


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


class _YieldingStream(io.StringIO):
    """A stream whose every write lets another thread run, as a pipe or a full buffer can."""

    def write(self, s: str) -> int:
        n = super().write(s)
        time.sleep(0.0005)
        return n


def test_lines_from_structlog_and_the_stdlib_never_interleave() -> None:
    """structlog's logger and the stdlib handler share the stream from different threads: each line
    must be written whole (PrintLogger wrote a line and its newline in two writes, and a Celery line
    landed between them, so one line held two JSON objects)."""
    stream = _YieldingStream()
    configure_logging("INFO", stream=stream)
    try:
        def emit(log: Callable[[int], None]) -> None:
            for i in range(200):
                log(i)

        threads = [threading.Thread(target=emit, args=(lambda i: structlog.get_logger().info("from.structlog", i=i),)),
                   threading.Thread(target=emit, args=(lambda i: logging.getLogger("celery.x").info("stdlib %d", i),))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = stream.getvalue().splitlines()
        assert len(lines) == 400
        assert all(isinstance(json.loads(line), dict) for line in lines)
    finally:
        configure_logging("INFO", stream=io.StringIO())
