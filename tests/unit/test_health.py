"""Worker state, health probes (liveness, readiness) and the HTTP server that serves them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from worker.ops.health import Health, ObservabilityServer, WorkerState
from worker.ops.metrics import Metrics


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
    assert (status, json.loads(body)) == (
        503, {"ok": False, "reason": "starting", "state": "starting", "has_model": False}
    )
    assert ctype == "application/json"

    health.mark_ready(has_model=True)
    status, body, _ = get(base + "/readyz")
    assert (status, json.loads(body)) == (200, {"ok": True, "reason": "ok", "state": "ready", "has_model": True})

    state["broker_ok"] = False
    status, body, _ = get(base + "/readyz")
    assert (status, json.loads(body)["reason"]) == (503, "broker unreachable")
    state["broker_ok"] = True
    health.mark_draining()
    status, body, _ = get(base + "/readyz")
    assert (status, json.loads(body)["reason"], json.loads(body)["state"]) == (503, "draining", "draining")

    assert get(base + "/healthz")[0] == 200
    assert get(base + "/nope")[0] == 404


def test_liveness_flips_when_heartbeat_is_stale_with_pending_work(served) -> None:
    _, health, _, state, clock, base = served
    assert get(base + "/healthz")[0] == 200  # not started yet: nothing to judge

    health.mark_ready(has_model=True)
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
    health.mark_ready(has_model=True)
    clock.now += 11
    assert health.live()[0] is False


def test_broken_probe_functions_do_not_crash() -> None:
    def boom():
        raise ConnectionError("redis down")

    clock = FakeClock()
    health = Health(broker_ok_fn=boom, pending_fn=boom, batch_stuck_after_s=0, clock=clock)
    health.mark_ready(has_model=True)
    health.batch_heartbeat()
    ok, reason = health.ready()
    assert not ok and "ConnectionError" in reason
    clock.now += 1000
    assert health.live()[0] is True


def test_state_moves_forward_only_and_drives_readiness() -> None:
    health = Health()
    assert (health.state, health.ready()) == (WorkerState.STARTING, (False, "starting"))
    health.mark_draining()  # SIGTERM while the model loads
    health.mark_ready(has_model=True)  # the load finishes afterwards: still draining
    assert (health.state, health.ready()) == (WorkerState.DRAINING, (False, "draining"))
    assert health.has_model and health.model_ready  # loaded, finishing what it admitted
    health.mark_stopped()
    health.mark_draining()
    assert (health.state, health.ready()) == (WorkerState.STOPPED, (False, "stopped"))
    assert not health.model_ready and not health.warmed_up


def test_worker_without_a_model_is_ready_but_reports_no_model() -> None:
    clock = FakeClock()
    health = Health(broker_ok_fn=lambda: True, pending_fn=lambda: 1, batch_stuck_after_s=10, clock=clock)
    health.mark_ready(has_model=False)
    assert health.ready() == (True, "ok")
    assert (health.has_model, health.model_ready, health.warmed_up) == (False, False, False)
    clock.now += 100
    assert health.live()[0] is True  # no batch thread to be stuck


def test_warmed_up_only_when_warm_up_ran() -> None:
    cold = Health()
    cold.mark_ready(has_model=True, warmed_up=False)  # IVQ_WARMUP=false
    assert cold.ready() == (True, "ok") and cold.model_ready and not cold.warmed_up
    warm = Health()
    warm.mark_ready(has_model=True)
    assert warm.warmed_up
