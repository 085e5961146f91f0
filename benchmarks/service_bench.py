"""The whole service in one process: JobClient -> redis-server -> Celery worker -> file store -> status.

The worker is the real one (create_app + start_runtime + Celery's threads
pool, as tests/harness.py runs it) on an embedded redis-server; media sit in
the file store. Its loaded model is reused for the engine-only runs, so the
service and the bare engine are measured on the same weights, the same
requests and the same batching settings, one right after the other. The
bare engine is the one the worker runs (IVQ_ENGINE, continuous by default):
a ContinuousEngine behind a StepLoop, or the static Engine behind the
MicroBatcher, with the worker's cap and knobs.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.engine_bench import (
    ContinuousKnobs, percentile, prepare_all, run_batched, run_continuous, static_engine,
)
from benchmarks.mixes import Mix, decode_media


@dataclass
class ServiceConfig:
    model: str
    out_dir: Path
    max_batch_size: int = 8
    max_wait_ms: float = 20.0
    concurrency: int | None = None
    warmup: bool = True


class Service:
    """Start with `with Service(config) as service:`; `service.runtime` is the worker's runtime."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._stack = ExitStack()
        self.media_dir = (config.out_dir / "service" / "store" / "media").resolve()

    def __enter__(self) -> Service:
        from celery.contrib.testing.worker import start_worker

        from api_client import JobClient
        from worker.celery_app import create_app, start_runtime
        from worker.ops.embedded import EmbeddedRedis
        from worker.settings import Settings

        c = self.config
        root = (c.out_dir / "service").resolve()
        try:
            self.redis = EmbeddedRedis(root / "redis")
            self._stack.callback(self.redis.stop)
            self.settings = Settings(
                redis_url=self.redis.url, data_dir=root, store_url=f"file://{root / 'store'}",
                model=c.model, model_cache_dir=(c.out_dir / "models").resolve(), max_batch_size=c.max_batch_size,
                max_wait_ms=c.max_wait_ms, concurrency=c.concurrency, warmup=c.warmup, lease_s=120,
                log_level="WARNING",
                vision_cache_mb=0,  # as the Celery-task baseline and the engine benches: reuse is measured apart
            )
            self.app = app = create_app(self.settings)
            self.runtime = start_runtime(app)
            self._stack.callback(self.runtime.stop)
            self._stack.enter_context(start_worker(
                app, pool="threads", concurrency=self.settings.resolved_concurrency, perform_ping_check=False,
                queues=self.settings.queues, shutdown_timeout=60, loglevel="WARNING",
            ))
            self.client = JobClient(self.redis.url)
            self._stack.callback(self.client.close)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def attach(self, context: Any) -> Any:
        """Enter `context` now and leave it when the service stops (first, before the service's own worker)."""
        return self._stack.enter_context(context)

    def url_of(self, name: str) -> str:
        return f"file://{self.media_dir / name}"

    def read(self, url: str) -> bytes:
        return Path(url[len("file://"):]).read_bytes()

    @property
    def engine(self) -> Any:
        return self.runtime.model_thread.engine

    @property
    def continuous(self) -> bool:
        return self.settings.engine == "continuous"

    @property
    def knobs(self) -> ContinuousKnobs:
        return ContinuousKnobs.of(self.runtime.ctx.loaded, self.settings)

    def _counters(self) -> tuple[float, int, int]:
        """(seconds in the model, batch count, batched items): generate calls and their items for the
        static engine; decode steps and the rows they decoded for the continuous one."""
        s = self.engine.stats
        if self.continuous:
            return s.generate_seconds, s.decode_steps, s.decode_rows
        return s.generate_seconds, s.batches, s.items

    def prepared(self, mix: Mix) -> list:
        from model_runtime.media import MediaLimits

        decoded = decode_media(mix.requests, self.read, MediaLimits())
        return prepare_all(self.runtime.ctx.loaded, mix.requests, decoded, max_tiles=self.settings.max_tiles)

    def run_saturated(self, mix: Mix, timeout_s: float = 1800) -> dict[str, Any]:
        """Submit every job at once and wait for all; the model thread's share of the wall time."""
        before = self._counters()
        started = time.perf_counter()
        ids = self.client.submit_many(mix.requests)
        statuses = [self.client.wait(job_id, timeout=timeout_s) for job_id in ids]
        wall = time.perf_counter() - started
        after = self._counters()
        failed = [s.error for s in statuses if s.state.value != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} bench jobs failed, first: {failed[0]}")
        tokens = sum(self.client.result(job_id).usage.completion_tokens for job_id in ids)
        generate_s = after[0] - before[0]
        batches, items = after[1] - before[1], after[2] - before[2]
        return {"jobs": len(ids), "seconds": round(wall, 4), "jobs_per_s": round(len(ids) / wall, 4),
                "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
                "generate_seconds": round(generate_s, 4), "engine_busy_fraction": round(generate_s / wall, 4),
                "batches": batches, "mean_batch": round(items / batches, 2) if batches else 0.0}

    def run_engine_same_batching(self, items: list) -> dict[str, Any]:
        """The bare engine the worker runs, with the worker's cap and settings, on the same prepared jobs."""
        s = self.settings
        if self.continuous:
            run = run_continuous(self.runtime.ctx.loaded, items, cap=s.max_batch_size, knobs=self.knobs)
        else:  # the worker's static queue is cost-aware (worker/model/thread.py)
            run = run_batched(static_engine(self.runtime.ctx.loaded, s.max_batch_size), items, cap=s.max_batch_size,
                              max_wait_ms=s.max_wait_ms, cost_aware=True, max_batch_cost=s.max_batch_cost)
        return {**run.as_dict(), "engine": s.engine}

    def run_idle(self, mix: Mix, jobs: int) -> dict[str, Any]:
        """One job at a time: submit -> result, minus the time spent in generate."""
        overheads, preprocess, batch_wait, queued, after = [], [], [], [], []
        for request in mix.requests[:jobs]:
            started = time.perf_counter()
            job_id = self.client.submit(request)
            status = self.client.wait(job_id, timeout=600)
            latency_ms = (time.perf_counter() - started) * 1000.0
            if status.state.value != "succeeded":
                raise RuntimeError(f"idle bench job failed: {status.error}")
            timings = self.client.result(job_id).timings
            overheads.append(latency_ms - timings.generate_ms)
            preprocess.append(timings.preprocess_ms)
            batch_wait.append(timings.batch_wait_ms)
            queued.append(timings.queued_ms)
            after.append(latency_ms - timings.total_ms)  # result write, final transition, event, client wake-up
        return {"jobs": len(overheads), "p50": round(percentile(overheads, 50), 2),
                "p99": round(percentile(overheads, 99), 2), "preprocess_p50": round(percentile(preprocess, 50), 2),
                "batch_wait_p50": round(percentile(batch_wait, 50), 2),
                "queued_p50": round(percentile(queued, 50), 2), "after_generate_p50": round(percentile(after, 50), 2),
                "max_wait_ms": self.settings.max_wait_ms}
