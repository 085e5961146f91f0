"""Standard Webhooks signing and verification, including interop with the reference package."""

from __future__ import annotations

import base64
import json
import random
from datetime import datetime, UTC

import pytest
import standardwebhooks

from api_client.webhooks import WebhookVerificationError, generate_secret, sign, signed_headers, verify
from worker.jobs.callbacks import redact_url
from worker.jobs.errors import backoff_delay

NOW = 1_700_000_000
BODY = json.dumps({"type": "job.succeeded", "data": {"job_id": "j1", "text": "héllo"}}).encode()


@pytest.fixture
def secret() -> str:
    return generate_secret()


def test_generate_secret_form(secret):
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[len("whsec_") :])) == 32
    assert generate_secret() != secret


def test_round_trip_returns_payload(secret):
    headers = signed_headers(secret, "msg_1", BODY, timestamp=NOW)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert verify(secret, headers, BODY, now=NOW + 10) == json.loads(BODY)


def test_header_names_are_case_insensitive(secret):
    headers = {k.upper(): v for k, v in signed_headers(secret, "msg_1", BODY, timestamp=NOW).items()}
    assert verify(secret, headers, BODY, now=NOW)["data"]["job_id"] == "j1"


def test_signature_matches_spec_formula():
    # Key is the base64-decoded part; message is "{id}.{timestamp}.{body}".
    import hashlib
    import hmac

    key = b"0123456789abcdef0123456789abcdef"
    secret = "whsec_" + base64.b64encode(key).decode()
    expected = base64.b64encode(hmac.new(key, b"msg_x.42.{}", hashlib.sha256).digest()).decode()
    assert sign(secret, "msg_x", 42, b"{}") == f"v1,{expected}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b.replace(b"j1", b"j2")),
        lambda h, b: ({**h, "webhook-id": "msg_2"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(NOW + 1)}, b),
        lambda h, b: ({**h, "webhook-signature": "v2," + h["webhook-signature"][3:]}, b),
        lambda h, b: ({**h, "webhook-signature": "v1,not-base64!!"}, b),
    ],
    ids=["body", "id", "timestamp", "version", "garbage"],
)
def test_tampering_is_detected(secret, tamper):
    headers, body = tamper(signed_headers(secret, "msg_1", BODY, timestamp=NOW), BODY)
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, body, now=NOW)


def test_wrong_secret_rejected(secret):
    headers = signed_headers(secret, "msg_1", BODY, timestamp=NOW)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(generate_secret(), headers, BODY, now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_rejected(secret, missing):
    headers = signed_headers(secret, "msg_1", BODY, timestamp=NOW)
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(secret, headers, BODY, now=NOW)


@pytest.mark.parametrize("offset,message", [(-301, "too old"), (301, "future")])
def test_timestamp_outside_tolerance_rejected(secret, offset, message):
    headers = signed_headers(secret, "msg_1", BODY, timestamp=NOW + offset)
    with pytest.raises(WebhookVerificationError, match=message):
        verify(secret, headers, BODY, now=NOW)
    assert verify(secret, headers, BODY, now=NOW, tolerance_s=400)["type"] == "job.succeeded"


def test_non_numeric_timestamp_rejected(secret):
    headers = {**signed_headers(secret, "msg_1", BODY, timestamp=NOW), "webhook-timestamp": "1e9"}
    with pytest.raises(WebhookVerificationError, match="invalid"):
        verify(secret, headers, BODY, now=NOW)


def test_any_of_several_signatures_may_match(secret):
    old_secret = generate_secret()
    ours = signed_headers(secret, "msg_1", BODY, timestamp=NOW)
    theirs = sign(old_secret, "msg_1", NOW, BODY)
    rotated = {**ours, "webhook-signature": f"v1a,xyz {theirs} {ours['webhook-signature']}"}
    assert verify(secret, rotated, BODY, now=NOW)["type"] == "job.succeeded"
    assert verify(old_secret, rotated, BODY, now=NOW)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        verify(generate_secret(), rotated, BODY, now=NOW)


def test_non_object_body_rejected(secret):
    headers = signed_headers(secret, "msg_1", b"[1,2]", timestamp=NOW)
    with pytest.raises(WebhookVerificationError, match="JSON object"):
        verify(secret, headers, b"[1,2]", now=NOW)


def test_bad_secret_is_a_value_error():
    with pytest.raises(ValueError):
        sign("whsec_***", "msg_1", NOW, b"{}")


def test_reference_package_verifies_our_signature(secret):
    headers = signed_headers(secret, "msg_ref", BODY)  # current time: the reference checks against now
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    tampered = BODY.replace(b"j1", b"j9")
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, headers)


def test_we_verify_reference_signature(secret):
    ts = datetime.now(UTC).replace(microsecond=0)
    reference = standardwebhooks.Webhook(secret)
    headers = {
        "webhook-id": "msg_theirs",
        "webhook-timestamp": str(int(ts.timestamp())),
        "webhook-signature": reference.sign("msg_theirs", ts, BODY.decode()),
    }
    assert verify(secret, headers, BODY) == json.loads(BODY)
    assert headers["webhook-signature"] == sign(secret, "msg_theirs", int(ts.timestamp()), BODY)


class _MaxRandom:
    """Always draws the top of the range, exposing the backoff ceiling."""

    def uniform(self, low: float, high: float) -> float:
        return high


def test_backoff_ceiling_grows_then_caps():
    ceilings = [backoff_delay(n, base_s=2.0, cap_s=60.0, rng=_MaxRandom()) for n in range(8)]
    assert ceilings == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert backoff_delay(10_000, base_s=2.0, cap_s=60.0, rng=_MaxRandom()) == 60.0


def test_backoff_full_jitter_bounds_and_growth():
    rng = random.Random(7)
    for attempt in range(10):
        samples = [backoff_delay(attempt, base_s=1.0, cap_s=100.0, rng=rng) for _ in range(300)]
        assert all(0.0 <= s <= min(100.0, 2.0**attempt) for s in samples)
        # Full jitter spreads over the whole range, down to near zero.
        assert min(samples) < 0.1 * min(100.0, 2.0**attempt)
    means = [sum(backoff_delay(a, base_s=1.0, cap_s=1e9, rng=rng) for _ in range(2000)) / 2000 for a in range(5)]
    assert means == sorted(means)


def test_redact_url_drops_query_and_userinfo():
    assert redact_url("https://u:p@hooks.example.com:8443/in?token=s3cr3t") == "https://hooks.example.com:8443/in"
