"""WorkerRuntime: one worker process's long-lived pieces and their lifecycle.

Start (fail fast, like TGI): connect Redis, open the store, load the model,
warm up at the largest batch, start the one model thread (worker/model_thread.py),
the lease renewer, the cancel watcher and the sweeper; only then is the worker ready.
Drain (SIGTERM): stop taking jobs, let the requests the engine admitted finish
(within IVQ_DRAIN_TIMEOUT_S), hand the jobs that never reached it back to the queue.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from api_client import keys
from api_client.schema import CallbackSpec
from worker.health import Health
from worker.jobs import Claim, JobStore
from worker.metrics import Metrics
from worker.model_thread import ModelThread, start_model_thread
from worker.pipeline import JobContext, process_job
from worker.results_store import open_store
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
    def __init__(
        self, settings: Settings, *, send_task: Callable[..., Any], metrics: Metrics | None = None,
        health: Health | None = None, load_model: bool = True,
    ):
        self.settings = settings
        self.worker_id = settings.resolved_worker_id
        self.send_task = send_task
        self.metrics = metrics or Metrics()
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30,
            retry_on_timeout=True,
        )
        self.jobs = JobStore(self.redis, worker_id=self.worker_id, lease_s=settings.lease_s,
                             max_crashes=settings.max_crashes)
        self.store = open_store(
            settings.resolved_store_url, s3_endpoint_url=settings.s3_endpoint_url,
            allowed_file_root=settings.resolved_file_root, s3_allowed_buckets=settings.s3_allowed_buckets,
        )
        self.health = health or Health(broker_ok_fn=self._broker_ok, pending_fn=lambda: self.batcher.pending
                                       if self.batcher else 0)
        self.load_model = load_model
        self.model_thread: ModelThread | None = None
        self.batcher: Any = None  # the model thread's queue (StepLoop or MicroBatcher)
        self.engine: Any = None
        self.loaded: Any = None
        self._held: dict[str, Claim] = {}
        self._cancelled: dict[str, threading.Event] = {}  # job id -> set once its claim is lost
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._batch_seq = 0

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> "WorkerRuntime":
        t0 = time.perf_counter()
        self.redis.ping()
        if self.load_model:
            self._load()
        self.metrics.model_loaded(time.perf_counter() - t0)
        for name, target in (("lease-renewer", self._renew_loop), ("cancel-watcher", self._cancel_loop),
                             ("sweeper", self._sweep_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.health.mark_ready(has_model=self.model_thread is not None, warmed_up=self.settings.warmup)
        self.heartbeat()
        log.info("worker.ready", worker_id=self.worker_id, startup_s=round(time.perf_counter() - t0, 3),
                 model=self.settings.model, max_batch_size=self.settings.max_batch_size)
        return self

    def _load(self) -> None:
        from model_runtime.loading import load_runtime

        s = self.settings
        self.loaded = load_runtime(
            s.model, cache_dir=s.resolved_model_cache_dir, device=s.device, dtype=s.dtype,
            attn_implementation=s.attn_implementation, quantization=s.quantization,
        )
        if self.loaded.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(cpu_model_threads())
        self.media_limits = s.media_limits()
        self.model_thread = start_model_thread(self.loaded, s, metrics=self.metrics, worker_id=self.worker_id,
                                               on_loop=self.health.batch_heartbeat)
        self.engine, self.batcher = self.model_thread.engine, self.model_thread.queue
        self.metrics.set_info(model=self.loaded.model_id, device=self.loaded.device, dtype=str(self.loaded.dtype),
                              attention=self.loaded.attn_implementation, worker_id=self.worker_id)

    def begin_drain(self) -> None:
        """SIGTERM: not ready, take no new jobs, hand back those the engine has not admitted."""
        if self._draining.is_set():
            return
        self._draining.set()
        self.health.mark_draining()
        log.info("worker.draining", drain_timeout_s=self.settings.drain_timeout_s)
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
        for t in self._threads:
            t.join(timeout=5)
        self.redis.close()
        self.health.mark_stopped()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    # ---- the job path ------------------------------------------------------
    def context(self) -> JobContext:
        return JobContext(
            settings=self.settings, jobs=self.jobs, store=self.store, batcher=self.batcher,
            processor=self.loaded.processor if self.loaded else None,
            model_id=self.loaded.model_id if self.loaded else self.settings.model,
            context_length=self.loaded.context_length if self.loaded else None,
            media_limits=getattr(self, "media_limits", None), metrics=self.metrics,
            enqueue=self.enqueue, notify=self.notify, hold=self._hold, release=self._release,
            is_draining=self._draining.is_set, fetch_https=self._fetch_https if self.settings.allow_https_media else None,
        )

    def process(self, job_id: str) -> str:
        return process_job(self.context(), job_id)

    def _fetch_https(self, url: str, max_bytes: int) -> bytes:
        from worker.errors import JobFailed
        from worker.netguard import guarded_request

        resp = guarded_request("GET", url, headers={}, body=None, timeout_s=30, max_response_bytes=max_bytes + 1,
                               allow_private=self.settings.callback_allow_private)
        if resp.status == 404:
            raise JobFailed("media_not_found", f"{resp.status} from media host")
        if resp.status >= 500:
            raise JobFailed("storage_unavailable", f"{resp.status} from media host", retryable=True)
        if resp.status != 200:
            raise JobFailed("invalid_media", f"{resp.status} from media host")
        if len(resp.body) > max_bytes:
            raise JobFailed("media_too_large", f"media over {max_bytes} bytes")
        return resp.body

    # ---- messages ----------------------------------------------------------
    def enqueue(self, job_id: str, priority: int = 0, countdown: float = 0) -> None:
        self.send_task(keys.INFER_TASK, args=[job_id], queue=keys.INFER_QUEUE,
                       priority=keys.celery_priority(priority), countdown=countdown or None)

    def notify(self, claim_or_id: Claim | str, event: str) -> None:
        """Queue a callback delivery for this event if the request asked for one."""
        if isinstance(claim_or_id, Claim):
            job_id, callback_json = claim_or_id.job_id, claim_or_id.callback_json
        else:
            job_id = claim_or_id
            raw = self.redis.hget(keys.job(job_id), "request")
            cb = json.loads(raw).get("callback") if raw else None
            callback_json = json.dumps(cb) if cb else None
        if not callback_json:
            return
        if event not in CallbackSpec.model_validate_json(callback_json).events:
            return
        try:
            self._send_notify(job_id, event)
        except Exception as exc:  # noqa: BLE001 - the transition recorded it; the sweeper re-sends
            log.warning("notify.send_failed", job_id=job_id, event=event, error=str(exc))

    def _send_notify(self, job_id: str, event: str) -> None:
        self.send_task(keys.NOTIFY_TASK, args=[job_id, event], queue=keys.CALLBACKS_QUEUE)

    # ---- leases and the sweeper -------------------------------------------
    def _hold(self, claim: Claim) -> Callable[[], bool]:
        """Renew this claim's lease from now on; returns the job's "was it cancelled?" check."""
        with self._held_lock:
            self._held[claim.job_id] = claim
            flag = self._cancelled.setdefault(claim.job_id, threading.Event())
        return flag.is_set

    def _release(self, claim: Claim) -> None:
        with self._held_lock:
            self._held.pop(claim.job_id, None)
            self._cancelled.pop(claim.job_id, None)

    def _cancel_loop(self) -> None:
        """Flag running jobs whose claim is gone (cancelled by the producer, or taken over):
        the engine drops them at its next step, so they stop using the GPU."""
        while not self._stop.wait(self.settings.cancel_poll_s):
            with self._held_lock:
                claims = list(self._held.values())
            try:
                lost = self.jobs.lost(claims)
            except redis.RedisError as exc:
                log.warning("cancel_watch.failed", error=str(exc))
                continue
            with self._held_lock:
                for job_id in lost:
                    if job_id in self._cancelled and not self._cancelled[job_id].is_set():
                        self._cancelled[job_id].set()
                        log.info("job.cancel_seen", job_id=job_id)

    def _renew_loop(self) -> None:
        interval = max(0.2, self.settings.lease_s / 3)
        while not self._stop.wait(interval):
            with self._held_lock:
                claims = list(self._held.values())
            for claim in claims:
                try:
                    if not self.jobs.renew(claim):
                        log.info("job.claim_lost", job_id=claim.job_id)
                except redis.RedisError as exc:
                    log.warning("lease.renew_failed", job_id=claim.job_id, error=str(exc))

    def heartbeat(self) -> None:
        """Tell operators (and the demo) that this worker is up and what it runs."""
        info = {"worker_id": self.worker_id, "at": time.time(), "draining": self.draining,
                "model": self.loaded.model_id if self.loaded else None,
                "max_batch_size": self.settings.max_batch_size}
        self.redis.hset(keys.WORKERS, self.worker_id, json.dumps(info))
        self.redis.expire(keys.WORKERS, max(60, 3 * self.settings.lease_s))

    def _sweep_loop(self) -> None:
        interval = max(0.5, self.settings.lease_s / 2)
        while not self._stop.wait(interval):
            try:
                self.heartbeat()
                self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - a sweep failure must not kill the worker
                log.warning("sweep.failed", error=str(exc))

    def sweep_once(self) -> None:
        result = self.jobs.sweep(resend_after_s=self.settings.visibility_timeout_s)
        for job_id in result.requeued + result.resend:
            self.enqueue(job_id, self.jobs.priority(job_id))
        for job_id in result.poisoned:
            self.metrics.job_finished("failed", "poison")
            self.notify(job_id, "failed")
        notifies = self.resend_lost_notifies()
        if result.requeued or result.poisoned or result.resend or notifies:
            log.info("sweep.done", requeued=len(result.requeued), poisoned=len(result.poisoned),
                     resent=len(result.resend), notifies_resent=notifies)

    def resend_lost_notifies(self, limit: int = 200) -> int:
        """Send again the notify of any event whose callback is still owed after a while."""
        now = time.time()
        stale = self.redis.zrangebyscore(keys.PENDING_NOTIFY, "-inf", now - self.settings.callback_resend_after_s,
                                         start=0, num=limit)
        for member in stale:
            job_id, _, event = member.decode().rpartition("|")
            self.redis.zadd(keys.PENDING_NOTIFY, {member: now}, xx=True)  # next try after another interval
            self._send_notify(job_id, event)
        return len(stale)

    def _broker_ok(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False
