"""WorkerRuntime: one worker process's long-lived pieces and their lifecycle.

Start (fail fast, like TGI, on what cannot fix itself): wait for Redis (with backoff, not
ready: a failover ends by itself), open the store, start the
preprocessing processes (worker/jobs/prep_pool.py; they load the processor
while this process loads the model), load the model, warm up at the largest
batch, start the one model thread (worker/model/thread.py), wait for the
preprocessing processes, and build the `JobContext` every job uses
(worker/jobs/pipeline.py); then start the
lease renewer, the cancel watcher and the sweeper (and, for the continuous engine, the
progress publisher, worker/jobs/progress.py). Only then is the worker ready.
Drain (SIGTERM): stop taking jobs, let the requests the engine admitted finish
(within IVQ_DRAIN_TIMEOUT_S), hand the jobs that never reached it back to the queue.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

import redis
import structlog

from api_client import keys
from api_client.dispatch import Dispatcher
from api_client.jobstate import JobStore
from api_client.broker_scan import messages_present
from api_client.lanes import Lanes
from api_client.redis_conn import sync_client
from worker.ops.health import Health, ObservabilityServer
from api_client.schema import CallbackSpec
from worker.http.batch_store import Batches
from worker.jobs.callbacks import build_delivery
from worker.jobs.held import HeldClaims
from worker.ops.metrics import Metrics
from worker.model.thread import ModelThread, start_model_thread
from worker.jobs.inputs import InputEnv, InThreadInputs
from worker.jobs.pipeline import Inputs, JobContext
from worker.jobs.prep_pool import PrepPool
from worker.jobs.progress import ProgressPublisher
from worker.io.results_store import open_store
from worker.settings import Settings

log = structlog.get_logger(__name__)


def cpu_model_threads() -> int:
    """Torch threads for a CPU worker: half the cores, the rest stay free for the task threads.

    With every core in torch's pool, the model thread and the task threads'
    decoding and preprocessing fight over the same cores and both slow down
    (benchmarks/BENCHMARKS.md, "torch intra-op threads"). OMP_NUM_THREADS, when
    set, wins.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class WorkerRuntime:
    def __init__(self, settings: Settings, *, dispatch: Dispatcher, metrics: Metrics | None = None,
                 health: Health | None = None, load_model: bool = True):
        self.settings = settings
        self.worker_id = settings.resolved_worker_id
        self.dispatch = dispatch
        self.metrics = metrics or Metrics()
        if not settings.redis_url:
            raise ValueError("settings.redis_url is required (the CLI starts an embedded Redis when unset)")
        self.redis = sync_client(settings.redis_url, socket_timeout=30, retries=10)
        self.jobs = JobStore(self.redis, worker_id=self.worker_id, lease_s=settings.lease_s,
                             max_crashes=settings.max_crashes)
        self.held = HeldClaims(self.jobs)
        self.batches = Batches(self.redis)
        self.lanes = Lanes(self.redis, dispatch, lane_jobs=settings.batch_lane_jobs,
                           resend_taken_s=settings.batch_resend_taken_s,
                           resend_sent_s=settings.resend_lost_after_s, present=self._messages_present)
        self.store = open_store(
            settings.resolved_store_url, s3_endpoint_url=settings.s3_endpoint_url,
            allowed_file_root=settings.resolved_file_root, s3_allowed_buckets=settings.s3_allowed_buckets,
        )
        self.health = health or Health(broker_ok_fn=self._broker_ok, pending_fn=self._pending)
        self.load_model = load_model
        self.model_thread: ModelThread | None = None
        self.progress: ProgressPublisher | None = None
        self.prep: PrepPool | None = None  # None: inputs are prepared on the task threads
        self.ctx: JobContext | None = None  # None on a callbacks-only worker
        self.server: ObservabilityServer | None = None
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> WorkerRuntime:
        t0 = time.perf_counter()
        self.wait_for_redis()
        if self.load_model:
            self.ctx = self._load()
        self.metrics.model_loaded(time.perf_counter() - t0)
        for name, every, work in (("lease-renewer", max(0.2, self.settings.lease_s / 3), self.held.renew_all),
                                  ("cancel-watcher", self.settings.cancel_poll_s, self.held.flag_lost),
                                  ("sweeper", self.settings.sweep_interval_s, self._sweep_and_beat),
                                  ("batch-releaser", self.settings.batch_release_s, self._release)):
            t = threading.Thread(target=self._every, args=(every, work), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.health.mark_ready(has_model=self.model_thread is not None, warmed_up=self.settings.warmup)
        try:
            self.heartbeat()
        except redis.RedisError as exc:  # Redis went away during the load: the sweeper beats again
            log.warning("worker.heartbeat_failed", error=str(exc))
        log.info("worker.ready", worker_id=self.worker_id, startup_s=round(time.perf_counter() - t0, 3),
                 model=self.settings.model, max_batch_size=self.settings.max_batch_size)
        return self

    def wait_for_redis(self, max_delay_s: float = 5.0) -> None:
        """Wait (backoff to `max_delay_s`) until Redis answers: during a failover or an outage a
        starting worker waits, not ready, instead of exiting into a crash loop. SIGTERM ends the wait."""
        delay, since = 0.2, time.monotonic()
        while True:
            try:
                self.redis.ping()
                return
            except redis.RedisError as exc:
                log.warning("worker.redis_unreachable", error=str(exc), waited_s=round(time.monotonic() - since, 1),
                            retry_in_s=delay)
            if self._stop.wait(delay):
                raise RuntimeError("stopped while waiting for Redis")
            delay = min(max_delay_s, delay * 2)

    def _load(self) -> JobContext:
        from model_runtime.loading import load_runtime, resolve_model_path

        s = self.settings
        if s.resolved_preprocess_workers:
            path = resolve_model_path(s.model, s.resolved_model_cache_dir)
            # Started first: the processes load the processor while this one loads the model.
            self.prep = PrepPool(s, model_path=path, size=s.resolved_preprocess_workers,
                                 cache_dir=None if os.path.isdir(path) else str(s.resolved_model_cache_dir)).start()
        loaded = load_runtime(
            s.model, cache_dir=s.resolved_model_cache_dir, device=s.device, dtype=s.dtype,
            attn_implementation=s.attn_implementation, quantization=s.quantization,
        )
        if loaded.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(cpu_model_threads())
        self.model_thread = start_model_thread(loaded, s, metrics=self.metrics, worker_id=self.worker_id,
                                               on_loop=self.health.batch_heartbeat)
        if s.progress_interval_s > 0 and s.engine == "continuous":
            self.progress = ProgressPublisher(self.jobs, loaded.processor.tokenizer).start()
        self.metrics.set_info(model=loaded.model_id, device=loaded.device, dtype=str(loaded.dtype),
                              attention=loaded.attn_implementation, worker_id=self.worker_id)
        inputs: Inputs
        if self.prep is not None:
            inputs = self.prep.wait_ready(context_length=loaded.context_length)
        else:
            inputs = InThreadInputs(InputEnv(settings=s, media=self.store.fetcher, processor=loaded.processor,
                                             media_limits=s.media_limits(), context_length=loaded.context_length))
        return JobContext(settings=s, jobs=self.jobs, held=self.held, dispatch=self.dispatch,
                          media=self.store.fetcher, results=self.store,
                          queue=self.model_thread.queue, loaded=loaded, media_limits=s.media_limits(),
                          metrics=self.metrics, is_draining=self._draining.is_set, inputs=inputs,
                          progress=self.progress)

    def begin_drain(self) -> None:
        """SIGTERM: not ready, take no new jobs, hand back those the engine has not admitted."""
        if self._draining.is_set():
            return
        self._draining.set()
        self.health.mark_draining()
        log.info("worker.draining", drain_timeout_s=self.settings.drain_timeout_s)
        if self.prep is not None:
            self.prep.begin_drain()
        if self.model_thread is not None:
            # Admitted requests finish; the rest fail with BatcherClosed, which the
            # pipeline classifies as "hand back without counting an attempt".
            threading.Thread(target=self.model_thread.stop, args=(self.settings.drain_timeout_s,), name="drain",
                             daemon=True).start()

    def stop(self) -> None:
        self.begin_drain()
        self._stop.set()
        if self.model_thread is not None:
            self.model_thread.stop(self.settings.drain_timeout_s)
        if self.progress is not None:
            self.progress.stop()
        if self.prep is not None:
            self.prep.stop()
        for t in self._threads:
            t.join(timeout=5)
        self.redis.close()
        self.health.mark_stopped()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def _every(self, interval: float, work: Callable[[], None]) -> None:
        while not self._stop.wait(interval):
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - a failed round must not kill the thread
                log.warning("background.failed", thread=threading.current_thread().name, error=str(exc))

    def _release(self) -> None:
        """Batch jobs to the broker in turns across tenants (api_client/lanes.py); not while draining."""
        if self.ctx is not None and not self.draining:
            self.lanes.release_once()

    # ---- the sweeper -------------------------------------------------------
    def _sweep_and_beat(self) -> None:
        self.heartbeat()
        self.sweep_once()
        self.batches.finish_ready(self.store, self._announce_batch)

    def _announce_batch(self, batch_id: str, callback: CallbackSpec, status: dict) -> None:
        """A batch's one completion callback (delivered like a job's, with a fixed webhook id)."""
        self.dispatch.deliver(build_delivery(batch_id, "completed", status, callback, kind="batch"))

    def sweep_once(self) -> None:
        """Repair what dead workers and lost messages left: every worker runs this."""
        changed = self.jobs.sweep(resend_after_s=self.settings.resend_lost_after_s, present=self._messages_present)
        for t in changed:
            if t.outcome in ("requeued", "resend"):
                self.dispatch.run_job(t.job_id, t.priority)
            elif t.outcome in ("poisoned", "expired"):
                self.metrics.job_finished("failed", "poison" if t.outcome == "poisoned" else "expired")
            self.dispatch.announce(t)
        owed = self.resend_lost_notifies()
        if changed or owed:
            count = {o: sum(t.outcome == o for t in changed) for o in ("requeued", "poisoned", "expired", "resend")}
            log.info("sweep.done", **count, notifies_resent=owed)

    def _messages_present(self, job_ids: set[str]) -> set[str]:
        """The jobs among these whose message is still in the broker (api_client/broker_scan.py)."""
        return messages_present(self.redis, job_ids, fresh_s=self.settings.resend_lost_after_s)

    def resend_lost_notifies(self, limit: int = 200) -> int:
        """Send again the notify of any event whose callback is still owed after a while."""
        owed = self.jobs.owed_callbacks(older_than_s=self.settings.callback_resend_after_s, limit=limit)
        for job_id, event in owed:
            self.dispatch.resend_notify(job_id, event)
        return len(owed)

    def heartbeat(self) -> None:
        """Tell operators (and the demo) that this worker is up and what it runs."""
        info = {"worker_id": self.worker_id, "at": time.time(), "draining": self.draining,
                "model": self.ctx.loaded.model_id if self.ctx else None,
                "max_batch_size": self.settings.max_batch_size}
        self.redis.hset(keys.WORKERS, self.worker_id, json.dumps(info))
        self.redis.expire(keys.WORKERS, max(60, 3 * self.settings.lease_s))

    def _pending(self) -> int:
        return self.model_thread.queue.pending if self.model_thread else 0

    def _broker_ok(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False
