"""Status callback delivery: sign, POST through the SSRF guard, retry with backoff, dead-letter.

A delivery is a small JSON-able dict that travels in the Celery message on the
"callbacks" queue. It never holds the secret, only the secret's name; the secret
is looked up in Settings on each attempt. `handle_delivery` makes one attempt
and says what happens next: None (done: delivered or dead-lettered) or the
delivery to send again after a delay. The webhook-id is fixed when the delivery
is built, so receivers can de-duplicate retries and replays. Which events get a
callback is not decided here: the state machine recorded it with the transition
(api_client/jobstate.py).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import time
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from api_client import keys
from api_client.schema import CallbackSpec
from api_client.webhooks import signed_headers
from worker.jobs.errors import backoff_delay
from worker.io.netguard import ForbiddenURL, guarded_request

if TYPE_CHECKING:
    from worker.settings import Settings

log = structlog.get_logger(__name__)

# Receiver answers that mean "try again later"; any other 4xx is permanent.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})
MAX_DEAD = 10_000  # keep the dead-letter list bounded if a receiver is gone for good
MAX_RESPONSE_BYTES = 16 * 1024
USER_AGENT = "internvl-queue-webhooks/1"

_TAKE_DEAD = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
  return items
end
local taken = {}
for _, raw in ipairs(items) do
  local ok, entry = pcall(cjson.decode, raw)
  if ok and type(entry) == 'table' and type(entry.delivery) == 'table'
      and entry.delivery.webhook_id == ARGV[1] then
    redis.call('LREM', KEYS[1], 1, raw)
    table.insert(taken, raw)
  end
end
return taken
"""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def event_webhook_id(job_id: str, event: str) -> str:
    """Derived from the job and the event, so a duplicated notify yields the same id and receivers
    can de-duplicate: one terminal callback per job, even under at-least-once delivery."""
    return f"msg_{job_id}_{event}"


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt came to; `retry` is the delivery to send again after `delay_s`."""

    outcome: str  # delivered | retry | dead
    retry: dict | None = None
    delay_s: float = 0.0


def build_delivery(job_id: str, event: str, payload: dict, callback: CallbackSpec, *, kind: str = "job") -> dict:
    """A new delivery for one job event (or, kind="batch", a batch's); its webhook_id stays the
    same through retries and replays."""
    body = {"type": f"{kind}.{event}", "timestamp": _now_iso(), "data": payload}
    return {
        "webhook_id": event_webhook_id(job_id, event),
        "job_id": job_id,
        "url": callback.url,
        "event": event,
        "secret_name": callback.secret_name,
        "body": json.dumps(body, separators=(",", ":"), sort_keys=True),
        "attempt": 0,
        "created_at": _now_iso(),
    }


def redact_url(url: str) -> str:
    """scheme://host[:port]/path, without userinfo or query string (which may carry tokens)."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
    except ValueError:
        return "<unparseable url>"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _resolve_secret(settings: Settings, secret_name: str | None) -> str | None:
    secret = settings.webhook_secrets.get(secret_name) if secret_name else settings.webhook_secret
    if secret is None:
        return None
    return secret.get_secret_value()


def _retry_after_s(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def handle_delivery(delivery: dict, *, settings: Settings, redis: Any) -> Attempt:
    """Make one attempt: delivered, dead-lettered, or to retry after a delay."""
    attempt = int(delivery.get("attempt", 0))
    blog = log.bind(
        job_id=delivery.get("job_id"),
        webhook_id=delivery.get("webhook_id"),
        attempt=attempt,
        callback_event=delivery.get("event"),
        target=redact_url(delivery.get("url", "")),
    )
    secret_name = delivery.get("secret_name")
    secret = _resolve_secret(settings, secret_name)
    if secret is None:
        reason = "no webhook secret configured" + (f" (name {secret_name!r})" if secret_name else "")
        blog.error("callback.no_secret", reason=reason)
        return dead_letter(redis, delivery, reason)

    body = delivery["body"].encode("utf-8")
    try:
        # A fresh timestamp each attempt, so a late retry is not rejected as stale.
        headers = signed_headers(secret, delivery["webhook_id"], body)
    except ValueError:
        blog.error("callback.bad_secret")
        return dead_letter(redis, delivery, "webhook secret is not valid whsec_<base64>")
    headers.update({"content-type": "application/json", "user-agent": USER_AGENT})

    started = time.monotonic()
    retry_after: float | None = None
    try:
        response = guarded_request(
            "POST",
            delivery["url"],
            headers=headers,
            body=body,
            timeout_s=settings.callback_timeout_s,
            max_response_bytes=MAX_RESPONSE_BYTES,
            allow_private=settings.callback_allow_private,
        )
    except ForbiddenURL as exc:
        blog.warning("callback.forbidden_url", reason=exc.message)
        return dead_letter(redis, delivery, f"forbidden url: {exc.message}")
    except (OSError, http.client.HTTPException) as exc:
        # Covers DNS failures, refused connections, TLS errors and timeouts (TimeoutError is an OSError).
        reason = f"network error: {type(exc).__name__}"
    else:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        status = response.status
        if 200 <= status < 300:
            blog.info("callback.delivered", status=status, elapsed_ms=elapsed_ms)
            return Attempt("delivered")
        if 300 <= status < 400 or (400 <= status < 500 and status not in RETRYABLE_4XX):
            blog.warning("callback.rejected", status=status, elapsed_ms=elapsed_ms)
            return dead_letter(redis, delivery, f"receiver answered HTTP {status} (permanent)")
        reason = f"receiver answered HTTP {status}"
        if status in (429, 503):
            retry_after = _retry_after_s(response.headers)

    if attempt + 1 >= settings.callback_max_attempts:
        blog.warning("callback.exhausted", reason=reason)
        return dead_letter(redis, delivery, f"gave up after {attempt + 1} attempts; last: {reason}")
    cap = settings.callback_backoff_cap_s
    delay = backoff_delay(attempt, base_s=settings.callback_backoff_base_s, cap_s=cap)
    if retry_after is not None:
        delay = min(cap, max(delay, retry_after))
    blog.info("callback.retry", reason=reason, delay_s=round(delay, 3))
    return Attempt("retry", {**delivery, "attempt": attempt + 1}, delay)


def dead_letter(redis: Any, delivery: dict, reason: str) -> Attempt:
    """Append a failed delivery to the dead-letter list (bounded; TTL refreshed on each push)."""
    entry = json.dumps({"delivery": delivery, "reason": reason, "failed_at": _now_iso()})
    pipe = redis.pipeline(transaction=True)
    pipe.rpush(keys.DEAD_CALLBACKS, entry)
    pipe.ltrim(keys.DEAD_CALLBACKS, -MAX_DEAD, -1)
    pipe.expire(keys.DEAD_CALLBACKS, keys.DEAD_LETTER_TTL_S)
    pipe.execute()
    log.warning(
        "callback.dead_letter",
        job_id=delivery.get("job_id"),
        webhook_id=delivery.get("webhook_id"),
        attempt=delivery.get("attempt"),
        reason=reason,
    )
    return Attempt("dead")


def _decode(raw: bytes | str) -> dict:
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def list_dead(redis: Any, limit: int = 100) -> list[dict]:
    """The oldest ``limit`` dead-letter entries: {delivery, reason, failed_at}."""
    if limit <= 0:
        return []
    return [_decode(raw) for raw in redis.lrange(keys.DEAD_CALLBACKS, 0, limit - 1)]


def take_dead(redis: Any, webhook_id: str | None = None) -> list[dict]:
    """Atomically remove dead entries (all, or those of one webhook_id) and return their deliveries.

    The deliveries come back with attempt 0 and their original webhook_id; the caller
    re-enqueues them (a replay is the same message to the receiver).
    """
    raws = redis.eval(_TAKE_DEAD, 1, keys.DEAD_CALLBACKS, webhook_id or "")
    return [{**_decode(raw)["delivery"], "attempt": 0} for raw in raws]
