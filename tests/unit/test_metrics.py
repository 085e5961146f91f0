"""Prometheus metrics: what the helpers record, served on /metrics; registries apart."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from worker.ops.health import Health, ObservabilityServer
from worker.ops.metrics import Metrics


@pytest.fixture
def served():
    metrics = Metrics()
    server = ObservabilityServer(0, metrics, Health(), host="127.0.0.1").start()
    yield metrics, f"http://127.0.0.1:{server.port}"
    server.stop()


def get(url: str) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read(), resp.headers["Content-Type"]


def test_metrics_text_after_calls(served) -> None:
    metrics, base = served
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


def test_the_vision_cache_is_read_at_each_scrape(served) -> None:
    from types import SimpleNamespace as VisionCacheSnapshot  # its fields (model_runtime/vision_cache.py)

    metrics, base = served
    snap = VisionCacheSnapshot(capacity_bytes=1000, bytes=600, entries=3, hits=5, misses=3, deduped=2, evictions=0)
    metrics.watch_vision_cache(lambda: snap)
    get(base + "/metrics")
    snap = VisionCacheSnapshot(capacity_bytes=1000, bytes=800, entries=4, hits=9, misses=4, deduped=2, evictions=1)
    text = get(base + "/metrics")[1].decode()
    for line in ('ivq_vision_cache_tiles_total{outcome="hit"} 9.0', 'ivq_vision_cache_tiles_total{outcome="miss"} 4.0',
                 'ivq_vision_cache_tiles_total{outcome="dedup"} 2.0', "ivq_vision_cache_evictions_total 1.0",
                 'ivq_vision_cache_bytes{kind="used"} 800.0', 'ivq_vision_cache_bytes{kind="capacity"} 1000.0',
                 "ivq_vision_cache_entries 4.0"):
        assert line in text, line


def test_metrics_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.job_finished("succeeded")
    assert b"ivq_jobs_total{" not in b.render()
    assert b'ivq_jobs_total{code="none",state="succeeded"} 1.0' in a.render()


def test_rendering_metrics_does_not_import_torch() -> None:
    code = (
        "import sys; from worker.ops.metrics import Metrics; Metrics().render(); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
