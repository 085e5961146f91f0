"""What a started worker reports about itself, against a real Redis."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from worker.celery_app import create_app
from worker.ops.health import ObservabilityServer, WorkerState
from worker.runtime import WorkerRuntime
from worker.settings import Settings


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_callbacks_only_worker_is_ready_without_claiming_a_model(redis_url, redis_client, tmp_path):
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, queues=["callbacks"])
    runtime = WorkerRuntime(settings, dispatch=create_app(settings).ivq_dispatch, load_model=False)
    server = ObservabilityServer(0, runtime.metrics, runtime.health, host="127.0.0.1").start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(base + "/readyz")[1]["state"] == "starting"
        runtime.start()
        health = runtime.health
        assert health.state is WorkerState.READY
        assert (health.has_model, health.model_ready, health.warmed_up) == (False, False, False)
        assert _get(base + "/readyz") == (200, {"ok": True, "reason": "ok", "state": "ready", "has_model": False})
        assert _get(base + "/healthz")[0] == 200

        runtime.stop()
        assert _get(base + "/readyz") == (503, {"ok": False, "reason": "stopped", "state": "stopped",
                                                "has_model": False})
    finally:
        server.stop()
