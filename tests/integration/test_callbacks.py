"""Callback delivery against a real redis-server and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis as redis_lib
import standardwebhooks
from structlog.testing import capture_logs

from api_client import keys
from api_client.schema import CallbackSpec
from api_client.webhooks import WebhookVerificationError, generate_secret, verify
from worker.ops.embedded import free_port
from worker.jobs.callbacks import build_delivery, handle_delivery, list_dead, take_dead
from worker.settings import Settings

SECRET = generate_secret()
OTHER_SECRET = generate_secret()


@pytest.fixture
def r(redis_url) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


class Receiver:
    """A webhook receiver that answers from a script (default 200) and records every request."""

    def __init__(self) -> None:
        self.script: list[int | tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                step = receiver.script.pop(0) if receiver.script else 200
                status, extra = step if isinstance(step, tuple) else (step, {})
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ivq?token=tok123"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def _settings(redis_url: str, **overrides) -> Settings:
    values = dict(
        redis_url=redis_url,
        webhook_secret=SECRET,
        webhook_secrets={"tenant-b": OTHER_SECRET},
        callback_allow_private=True,
        callback_max_attempts=4,
        callback_backoff_base_s=0.5,
        callback_backoff_cap_s=30.0,
        callback_timeout_s=2.0,
    )
    values.update(overrides)
    return Settings(**values)


def _delivery(url: str, secret_name: str | None = None, event: str = "succeeded", job_id: str = "job-123") -> dict:
    spec = CallbackSpec(url=url, secret_name=secret_name)
    return build_delivery(job_id, event, {"job_id": job_id, "state": event}, spec)


def test_build_delivery_shape():
    spec = CallbackSpec(url="https://hooks.example.com/x", events=["failed"])
    delivery = build_delivery("job-1", "failed", {"job_id": "job-1"}, spec)
    assert json.loads(json.dumps(delivery)) == delivery  # travels as JSON
    assert delivery["webhook_id"].startswith("msg_") and delivery["attempt"] == 0
    # One id per (job, event): a duplicated notify is the same message to the receiver.
    assert delivery["webhook_id"] == build_delivery("job-1", "failed", {}, spec)["webhook_id"]
    assert delivery["webhook_id"] != build_delivery("job-1", "succeeded", {}, spec)["webhook_id"]
    body = json.loads(delivery["body"])
    assert body["type"] == "job.failed" and body["data"] == {"job_id": "job-1"} and "T" in body["timestamp"]


def test_delivered_and_verified_by_both_implementations(redis_url, r, receiver):
    delivery = _delivery(receiver.url)
    assert handle_delivery(delivery, settings=_settings(redis_url), redis=r).outcome == "delivered"
    assert len(receiver.requests) == 1
    path, headers, body = receiver.requests[0]
    assert path == "/hooks/ivq?token=tok123"
    assert headers["webhook-id"] == delivery["webhook_id"]
    assert {k.lower(): v for k, v in headers.items()}["content-type"] == "application/json"
    event = verify(SECRET, headers, body)
    assert event["type"] == "job.succeeded" and event["data"]["job_id"] == "job-123"
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == event
    assert list_dead(r) == []


def test_named_secret_is_used(redis_url, r, receiver):
    delivery = _delivery(receiver.url, secret_name="tenant-b")
    assert handle_delivery(delivery, settings=_settings(redis_url), redis=r).outcome == "delivered"
    _, headers, body = receiver.requests[0]
    assert verify(OTHER_SECRET, headers, body)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, body)


def test_retries_keep_webhook_id_then_succeed(redis_url, r, receiver):
    receiver.script = [503, 503, 200]
    settings = _settings(redis_url)
    delivery = _delivery(receiver.url)
    first = handle_delivery(delivery, settings=settings, redis=r)
    assert first.outcome == "retry"
    retry1, delay1 = first.retry, first.delay_s
    assert retry1["attempt"] == 1 and retry1["webhook_id"] == delivery["webhook_id"]
    assert 0.0 <= delay1 <= 0.5
    second = handle_delivery(retry1, settings=settings, redis=r)
    retry2, delay2 = second.retry, second.delay_s
    assert retry2["attempt"] == 2 and retry2["webhook_id"] == delivery["webhook_id"]
    assert 0.0 <= delay2 <= 1.0
    assert handle_delivery(retry2, settings=settings, redis=r).outcome == "delivered"
    ids = {headers["webhook-id"] for _, headers, _ in receiver.requests}
    assert len(receiver.requests) == 3 and ids == {delivery["webhook_id"]}
    for _, headers, body in receiver.requests:  # every attempt is validly signed
        assert verify(SECRET, headers, body)["data"]["state"] == "succeeded"
    assert list_dead(r) == []


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502])
def test_transient_statuses_retry(redis_url, r, receiver, status):
    receiver.script = [status]
    result = handle_delivery(_delivery(receiver.url), settings=_settings(redis_url), redis=r)
    assert result.outcome == "retry" and result.retry["attempt"] == 1
    assert list_dead(r) == []


def test_retry_after_is_honoured_up_to_the_cap(redis_url, r, receiver):
    receiver.script = [(503, {"Retry-After": "7"}), (429, {"Retry-After": "999"})]
    settings = _settings(redis_url)
    first = handle_delivery(_delivery(receiver.url), settings=settings, redis=r)
    assert 7.0 <= first.delay_s <= 30.0
    assert handle_delivery(first.retry, settings=settings, redis=r).delay_s == 30.0  # callback_backoff_cap_s


@pytest.mark.parametrize("status", [400, 401, 404, 410, 301])
def test_permanent_statuses_dead_letter_at_once(redis_url, r, receiver, status):
    receiver.script = [status]
    delivery = _delivery(receiver.url)
    assert handle_delivery(delivery, settings=_settings(redis_url), redis=r).outcome == "dead"
    assert len(receiver.requests) == 1
    [entry] = list_dead(r)
    assert entry["delivery"]["webhook_id"] == delivery["webhook_id"]
    assert str(status) in entry["reason"] and entry["failed_at"]
    assert 0 < r.ttl(keys.DEAD_CALLBACKS) <= keys.DEAD_LETTER_TTL_S


def test_exhausted_attempts_dead_letter(redis_url, r, receiver):
    receiver.script = [500] * 10
    settings = _settings(redis_url, callback_max_attempts=3)
    delivery: dict | None = _delivery(receiver.url)
    outcomes = []
    while delivery is not None:
        step = handle_delivery(delivery, settings=settings, redis=r)
        outcomes.append(step.outcome)
        delivery = step.retry
    assert len(receiver.requests) == 3 and outcomes == ["retry", "retry", "dead"]
    [entry] = list_dead(r)
    assert entry["delivery"]["attempt"] == 2 and "3 attempts" in entry["reason"]


def test_network_error_retries_then_dead_letters(redis_url, r):
    url = f"http://127.0.0.1:{free_port()}/nobody-home"
    settings = _settings(redis_url, callback_max_attempts=2)
    retry = handle_delivery(_delivery(url), settings=settings, redis=r).retry
    assert retry["attempt"] == 1
    assert handle_delivery(retry, settings=settings, redis=r).outcome == "dead"
    assert "network error" in list_dead(r)[0]["reason"]


def test_forbidden_url_dead_letters_without_request(redis_url, r, receiver):
    settings = _settings(redis_url, callback_allow_private=False)
    assert handle_delivery(_delivery(receiver.url), settings=settings, redis=r).outcome == "dead"
    assert receiver.requests == []
    assert list_dead(r)[0]["reason"].startswith("forbidden url")


def test_missing_secret_dead_letters(redis_url, r, receiver):
    settings = _settings(redis_url, webhook_secret=None)
    assert handle_delivery(_delivery(receiver.url), settings=settings, redis=r).outcome == "dead"
    assert handle_delivery(_delivery(receiver.url, secret_name="nope"), settings=settings, redis=r).outcome == "dead"
    assert receiver.requests == []
    reasons = [e["reason"] for e in list_dead(r)]
    assert len(reasons) == 2 and all("no webhook secret" in reason for reason in reasons)


def test_list_and_take_dead_round_trip(redis_url, r, receiver):
    receiver.script = [400, 400, 400]
    settings = _settings(redis_url)
    deliveries = [_delivery(receiver.url, job_id=f"job-{i}") for i in range(3)]
    for delivery in deliveries:
        assert handle_delivery({**delivery, "attempt": 2}, settings=settings, redis=r).outcome == "dead"
    assert [e["delivery"]["webhook_id"] for e in list_dead(r)] == [d["webhook_id"] for d in deliveries]
    assert len(list_dead(r, limit=2)) == 2

    [one] = take_dead(r, deliveries[1]["webhook_id"])
    assert one == deliveries[1]  # attempt back to 0, same webhook_id
    remaining = [e["delivery"]["webhook_id"] for e in list_dead(r)]
    assert remaining == [deliveries[0]["webhook_id"], deliveries[2]["webhook_id"]]
    assert take_dead(r, "msg_unknown") == []

    # A replayed delivery goes out again under its original webhook-id.
    assert handle_delivery(one, settings=settings, redis=r).outcome == "delivered"  # the script ran out: 200
    assert receiver.requests[-1][1]["webhook-id"] == deliveries[1]["webhook_id"]

    rest = take_dead(r)
    assert {d["webhook_id"] for d in rest} == {deliveries[0]["webhook_id"], deliveries[2]["webhook_id"]}
    assert all(d["attempt"] == 0 for d in rest)
    assert list_dead(r) == [] and not r.exists(keys.DEAD_CALLBACKS)


def test_secret_never_reaches_redis(redis_url, r, receiver):
    receiver.script = [400, 500]
    settings = _settings(redis_url, callback_max_attempts=1)
    handle_delivery(_delivery(receiver.url), settings=settings, redis=r)
    handle_delivery(_delivery(receiver.url, secret_name="tenant-b"), settings=settings, redis=r)
    handle_delivery(_delivery(receiver.url, secret_name="missing"), settings=settings, redis=r)
    assert len(list_dead(r)) == 3
    dump = b""
    for key in r.scan_iter("*"):
        dump += key
        kind = r.type(key)
        if kind == b"list":
            dump += b"".join(r.lrange(key, 0, -1))
        elif kind == b"string":
            dump += r.get(key)
        elif kind == b"hash":
            dump += b"".join(k + v for k, v in r.hgetall(key).items())
    assert dump
    for secret in (SECRET, OTHER_SECRET):
        assert secret.encode() not in dump
        assert secret.removeprefix("whsec_").encode() not in dump


def test_logs_carry_ids_but_no_secret_or_query(redis_url, r, receiver):
    receiver.script = [500, 400]
    settings = _settings(redis_url)
    with capture_logs() as logs:
        retry = handle_delivery(_delivery(receiver.url), settings=settings, redis=r).retry
        handle_delivery(retry, settings=settings, redis=r)
    events = [entry["event"] for entry in logs]
    assert "callback.retry" in events and "callback.dead_letter" in events
    assert all(entry["webhook_id"] == retry["webhook_id"] and entry["job_id"] == "job-123" for entry in logs)
    text = repr(logs)
    assert SECRET not in text and "tok123" not in text
