"""Health probes (liveness, readiness) and the HTTP server that serves them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from worker.health import Health, ObservabilityServer
from worker.metrics import Metrics


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
