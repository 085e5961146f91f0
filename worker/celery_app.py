"""The Celery app factory, and the three tasks a worker runs.

- `ivq.infer(job_id)` runs one job: worker/jobs/pipeline.py `process_job`;
- `ivq.notify(job_id, event)` builds the callback an event owes (worker/jobs/notify.py)
  and makes the first delivery attempt;
- `ivq.deliver_callback(delivery)` makes one more attempt.
An attempt is counted in `ivq_callbacks` and a retry goes back through the
app's one `Dispatcher` (api_client/dispatch.py), like every message a worker sends.

JSON only (a pickle message is refused), late acks, reject on worker loss,
prefetch 1, queues "infer" (GPU) and "callbacks" (cheap); task events for
Flower with IVQ_TASK_EVENTS=true (off by default: they cost Redis commands
per job). `create_app(settings)` is what the CLI uses; `celery -A
worker.celery_app worker --pool threads` also works: the module attribute
`app` is built from the environment on first access, not on import.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
import structlog
from celery import Celery, signals
from kombu import Exchange, Queue

from api_client import keys
from api_client.dispatch import Dispatcher
from api_client.jobstate import JobStore
from api_client.redis_conn import broker_options, broker_url, sync_client
from worker.io.broker import register as register_broker_transports
from worker.io.broker import transport_for
from worker.ops.metrics import Metrics
from worker.jobs.pipeline import process_job
from worker.runtime import WorkerRuntime
from worker.settings import Settings

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise ValueError("settings.redis_url is required (the CLI starts an embedded Redis when unset)")
    broker = broker_url(settings.redis_url)
    register_broker_transports()
    app = Celery("internvl-queue", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport=transport_for(broker),  # worker/io/broker.py: a lost Redis must not end the worker
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.resolved_concurrency,
        # Each queue on its own exchange and key: left to defaults, Celery binds
        # both to the default exchange and key, and every message reaches both.
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q)
                     for q in (keys.INFER_QUEUE, keys.CALLBACKS_QUEUE)],
        task_default_queue=keys.INFER_QUEUE,
        task_routes={keys.NOTIFY_TASK: {"queue": keys.CALLBACKS_QUEUE},
                     keys.CALLBACK_TASK: {"queue": keys.CALLBACKS_QUEUE}},
        # Scan for unacked messages of dead workers every 10 s, not kombu's default of
        # every 100 s (interval 10 x throttle 10): a callback message a killed worker had
        # taken is re-delivered soon after the visibility timeout, not minutes later.
        broker_transport_options={**keys.broker_transport_options(settings.visibility_timeout_s),
                                  "unacked_restore_throttle": 1, **broker_options(settings.redis_url)},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # through any outage: a worker that exits crash-loops a failover
        broker_channel_error_retry=True,  # READONLY from a demoted primary: reconnect (celery#7946)
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # our JSON lines go to stdout as they are
        worker_soft_shutdown_timeout=float(settings.drain_timeout_s),
    )
    app.ivq_settings = settings
    app.ivq_metrics = Metrics()  # one per worker: its tasks and its runtime count into it
    app.ivq_dispatch = Dispatcher(app)
    app.ivq_runtime = None
    app.ivq_redis = None
    _register_tasks(app)
    return app


def _register_tasks(app: Celery) -> None:
    settings: Settings = app.ivq_settings
    dispatch: Dispatcher = app.ivq_dispatch
    metrics: Metrics = app.ivq_metrics

    # shared=False: Celery's default would hand these closures (bound to this app's
    # runtime) to every app created later in the process, e.g. a second worker app.
    @app.task(name=keys.INFER_TASK, ignore_result=True, shared=False)
    def infer(job_id: str) -> str:
        runtime = app.ivq_runtime
        if runtime is None or runtime.ctx is None:
            raise RuntimeError("this worker does not serve the infer queue (no model loaded)")
        return process_job(runtime.ctx, job_id)

    def attempt(delivery: dict) -> str:
        """One delivery attempt, counted; a retry goes back on the callbacks queue."""
        from worker.jobs.callbacks import handle_delivery

        done = handle_delivery(delivery, settings=settings, redis=_redis(app))
        metrics.callback_attempt(done.outcome)
        if done.retry is not None:
            dispatch.deliver(done.retry, countdown=done.delay_s)
            return f"retry in {done.delay_s:.1f}s"
        return done.outcome

    @app.task(name=keys.NOTIFY_TASK, ignore_result=True, shared=False)
    def notify(job_id: str, event: str) -> str:
        from worker.jobs.notify import build_event_delivery

        jobs = JobStore(_redis(app))
        delivery = build_event_delivery(jobs, job_id, event)
        outcome = "no-callback" if delivery is None else attempt(delivery)
        # Delivered, dead-lettered or scheduled for retry: this event's callback is no longer owed.
        jobs.callback_settled(job_id, event)
        return outcome

    @app.task(name=keys.CALLBACK_TASK, ignore_result=True, shared=False)
    def deliver_callback(delivery: dict) -> str:
        return attempt(delivery)


def _redis(app: Celery) -> redis.Redis:
    if app.ivq_redis is None:
        app.ivq_redis = sync_client(app.ivq_settings.redis_url, socket_timeout=30, retries=10)
    return app.ivq_redis


def start_runtime(app: Celery, *, load_model: bool | None = None) -> WorkerRuntime:
    """Load the model, warm up and start the model thread, once (before consuming)."""
    if app.ivq_runtime is not None:
        return app.ivq_runtime
    settings: Settings = app.ivq_settings
    if load_model is None:
        load_model = keys.INFER_QUEUE in settings.queues
    runtime = WorkerRuntime(settings, dispatch=app.ivq_dispatch, metrics=app.ivq_metrics, load_model=load_model)
    if settings.metrics_port is not None:
        from worker.ops.health import ObservabilityServer

        runtime.server = ObservabilityServer(settings.metrics_port, runtime.metrics, runtime.health).start()
    runtime.start()
    app.ivq_runtime = runtime
    return runtime


def install_shutdown_hooks(app: Celery) -> None:
    """SIGTERM begins the drain; a watchdog ends the process if the drain overruns."""

    def on_shutdown(sig: str = "", how: str = "", exitcode: int = 0, **_: Any) -> None:
        runtime = app.ivq_runtime
        if runtime is None:
            return
        runtime.begin_drain()
        limit = app.ivq_settings.drain_timeout_s + 5

        def watchdog() -> None:
            log.error("worker.drain_overrun", limit_s=limit)
            os._exit(1)  # leases expire and another worker finishes what was in flight

        timer = threading.Timer(limit, watchdog)
        timer.daemon = True
        timer.start()

    signals.worker_shutting_down.connect(on_shutdown, weak=False)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            start_runtime(app)

    signals.worker_init.connect(on_worker_init, weak=False)


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app`; build it then, from the environment.
    if name == "app":
        from worker.ops.logs import configure_logging

        settings = Settings()
        configure_logging(settings.log_level)
        built = create_app(settings)
        install_shutdown_hooks(built)
        globals()["app"] = built
        return built
    raise AttributeError(name)
