"""The worker's Prometheus metrics.

`Metrics` owns its own registry, so several can live in one process (tests,
a worker and its callback pool). `worker/ops/health.py` serves them on /metrics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

# From a tiny CPU model's milliseconds to a large GPU batch's minutes.
_TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600,
)  # fmt: skip
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_COST_BUCKETS = tuple(float(4**i) for i in range(11))  # 1 .. ~1M (tokens, tiles, frames...)


class Metrics:
    """The worker's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("ivq_jobs", "Jobs finished, by final state and error code", ["state", "code"], registry=r)
        self.queue_wait = Histogram(
            "ivq_queue_wait_seconds", "Enqueue to claim", buckets=_QUEUE_BUCKETS, registry=r
        )
        self.preprocess = Histogram(
            "ivq_preprocess_seconds", "Media fetch + decode + prompt build per job", buckets=_TIME_BUCKETS, registry=r
        )
        self.batch_wait = Histogram(
            "ivq_batch_wait_seconds", "Submit to the batcher until its batch starts", buckets=_BATCH_WAIT_BUCKETS,
            registry=r,
        )
        self.generate = Histogram(
            "ivq_generate_seconds", "One generate_batch call", buckets=_TIME_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "ivq_batch_size", "Largest running batch a job decoded in (static: jobs per generate)",
            buckets=_SIZE_BUCKETS, registry=r,
        )
        self.batch_cost = Histogram("ivq_batch_cost", "Cost units per generate call", buckets=_COST_BUCKETS, registry=r)
        self.tokens = Counter("ivq_tokens_generated", "New tokens generated", registry=r)
        self.in_flight = Gauge("ivq_jobs_in_flight", "Jobs held by task threads now", registry=r)
        self.gpu_memory = Gauge(
            "ivq_gpu_memory_bytes", "CUDA memory of this process", ["device", "kind"], registry=r
        )
        self.model_load = Gauge("ivq_model_load_seconds", "Model load + warm-up time at start", registry=r)
        self.callbacks = Counter("ivq_callbacks", "Webhook delivery attempts, by outcome", ["outcome"], registry=r)
        self.retries = Counter("ivq_job_retries", "Jobs sent back to the queue, by error code", ["code"], registry=r)
        self.info = Info("ivq_worker", "Static facts about this worker", registry=r)
        # Vision reuse (model_runtime/vision_cache.py), in tiles; refreshed from the engine's cache at each scrape.
        self.vision_cache_tiles = Counter("ivq_vision_cache_tiles", "Image tiles looked up in the vision cache: "
                                          "hit (stored), miss (run through the tower), dedup (repeated within "
                                          "one vision call, run once)", ["outcome"], registry=r)
        self.vision_cache_bytes = Gauge("ivq_vision_cache_bytes", "Vision cache: bytes held, and its bound",
                                        ["kind"], registry=r)
        self.vision_cache_entries = Gauge("ivq_vision_cache_entries", "Tiles held in the vision cache", registry=r)
        self.vision_cache_evictions = Counter("ivq_vision_cache_evictions", "Tiles evicted (least recently used)",
                                              registry=r)
        self._vision_cache: Callable[[], Any] | None = None
        self._vision_seen: dict[str, int] = {}

    # Small helpers, so call sites stay one line.
    def job_finished(self, state: str, code: str | None = None) -> None:
        self.jobs.labels(state=str(state), code=str(code or "none")).inc()

    def job_retried(self, code: str) -> None:
        self.retries.labels(code=str(code)).inc()

    def observe_job(
        self,
        *,
        queue_wait_s: float | None = None,
        preprocess_s: float | None = None,
        batch_wait_s: float | None = None,
    ) -> None:
        for hist, value in (
            (self.queue_wait, queue_wait_s),
            (self.preprocess, preprocess_s),
            (self.batch_wait, batch_wait_s),
        ):
            if value is not None:
                hist.observe(max(0.0, value))

    def observe_batch(self, size: int, cost: float, generate_s: float, tokens_generated: int = 0) -> None:
        self.batch_size.observe(size)
        self.batch_cost.observe(cost)
        self.generate.observe(generate_s)
        if tokens_generated:
            self.tokens.inc(tokens_generated)

    def callback_attempt(self, outcome: str) -> None:
        self.callbacks.labels(outcome=str(outcome)).inc()

    def model_loaded(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def set_info(self, **facts: str) -> None:
        self.info.info({k: str(v) for k, v in facts.items()})

    @contextmanager
    def track_in_flight(self) -> Iterator[None]:
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    def refresh_gpu_memory(self) -> None:
        # Only look at torch if the process already imported it: the callback
        # worker and the tests must not pay for importing torch here.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            self.gpu_memory.labels(device=device, kind="allocated").set(torch.cuda.memory_allocated(index))
            self.gpu_memory.labels(device=device, kind="reserved").set(torch.cuda.memory_reserved(index))
            self.gpu_memory.labels(device=device, kind="max_allocated").set(torch.cuda.max_memory_allocated(index))

    def watch_vision_cache(self, snapshot: Callable[[], Any]) -> None:
        """`snapshot()` returns the engine's VisionCacheSnapshot; read at every scrape."""
        self._vision_cache = snapshot

    def refresh_vision_cache(self) -> None:
        if self._vision_cache is None:
            return
        snap = self._vision_cache()
        for outcome, total in (("hit", snap.hits), ("miss", snap.misses), ("dedup", snap.deduped),
                               ("evicted", snap.evictions)):
            delta = total - self._vision_seen.get(outcome, 0)
            self._vision_seen[outcome] = total
            if delta > 0:
                (self.vision_cache_evictions if outcome == "evicted"
                 else self.vision_cache_tiles.labels(outcome=outcome)).inc(delta)
        self.vision_cache_bytes.labels(kind="used").set(snap.bytes)
        self.vision_cache_bytes.labels(kind="capacity").set(snap.capacity_bytes)
        self.vision_cache_entries.set(snap.entries)

    def render(self) -> bytes:
        self.refresh_gpu_memory()
        self.refresh_vision_cache()
        return generate_latest(self.registry)
