"""Sign and verify status callbacks (Standard Webhooks, https://www.standardwebhooks.com).

The worker signs every callback it sends; a receiver imports this module (standard
library only) to check that a request really came from the service and is fresh.

Each request carries three headers:

- ``webhook-id``: unique per message and kept across retries (use it to de-duplicate),
- ``webhook-timestamp``: unix seconds when this attempt was signed,
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``;
  several space-separated signatures may be present while a secret is rotated.

Secrets look like ``whsec_<base64>``; the HMAC key is the decoded part.

A receiver (any framework; here Flask)::

    from api_client.webhooks import WebhookVerificationError, verify

    @app.post("/hooks/internvl")
    def hook():
        try:
            event = verify(SECRET, request.headers, request.get_data())
        except WebhookVerificationError:
            return "", 400
        if already_seen(request.headers["webhook-id"]):
            return "", 204  # a retry of something we already processed
        handle(event["type"], event["data"])  # e.g. "job.succeeded", {"job_id": ...}
        return "", 204

Answer 2xx quickly; 408, 409, 425, 429 and 5xx make the service retry with backoff,
any other 4xx is treated as permanent and the delivery is dead-lettered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "generate_secret",
    "sign",
    "signed_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The request is not a valid, fresh, correctly signed webhook: reject it (HTTP 400)."""


def generate_secret(nbytes: int = 32) -> str:
    """A new random secret in the ``whsec_<base64>`` form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def _key(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        # Tolerate unpadded base64, as the reference implementation does.
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret is not valid base64 (expected whsec_<base64>)") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) for one message."""
    digest = _digest(_key(secret), msg_id, int(timestamp), _as_bytes(body))
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(secret: str, msg_id: str, body: bytes | str, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for sending ``body`` now (or at ``timestamp``)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check the signature and freshness of a webhook and return its parsed JSON object.

    ``headers`` is any mapping with ``.items()`` (names compared case-insensitively).
    Raises WebhookVerificationError on a missing header, a timestamp further than
    ``tolerance_s`` from ``now``, no matching ``v1`` signature, or a body that is not a JSON object.
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not timestamp.strip().isdigit():
        raise WebhookVerificationError("invalid webhook-timestamp")
    ts = int(timestamp)
    current = time.time() if now is None else now
    if ts < current - tolerance_s:
        raise WebhookVerificationError("webhook timestamp too old")
    if ts > current + tolerance_s:
        raise WebhookVerificationError("webhook timestamp too far in the future")

    data = _as_bytes(body)
    expected = _digest(_key(secret), msg_id, ts, data)
    matched = False
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Check every candidate (no early exit) so timing does not reveal which one matched.
        matched |= hmac.compare_digest(expected, given)
    if not matched:
        raise WebhookVerificationError("no matching signature")
    try:
        payload = json.loads(data)
    except ValueError:
        raise WebhookVerificationError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return payload
