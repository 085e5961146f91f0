"""Every Celery message the service sends goes through one `Dispatcher`.

Three messages exist: run a job (queue "infer"), announce one event of a job
(queue "callbacks": its task builds the callback the event owes and delivers
it), and try a delivery again (queue "callbacks"). The producer, the worker,
the sweeper, the CLI and the callback retry all send through this object, so
queues, priorities and the publish retry policy are decided here once.

A message is only how a worker hears of something; the job record is the
truth. A lost "run" message is re-sent by the sweeper (the job stays in the
`queued` index), a lost "notify" too (the owed callback stays in the `notify`
index), so a failed notify publish is logged, not raised.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery

from api_client import keys
from api_client.jobstate import Transition
from api_client.redis_conn import broker_options, broker_url

log = structlog.get_logger(__name__)

PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def producer_app(redis_url: str) -> Celery:
    """A Celery app that can only send our tasks (the producer never runs them)."""
    app = Celery("internvl-queue-producer", broker=broker_url(redis_url), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={**keys.broker_transport_options(), **broker_options(redis_url)},
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=3,
    )
    return app


class Dispatcher:
    def __init__(self, app: Celery):
        self.app = app

    def run_job(self, job_id: str, priority: int = 0, *, countdown: float | None = None) -> None:
        """Send the "run this job" message for an existing record (also to repair a lost one)."""
        self._send(keys.INFER_TASK, [job_id], keys.INFER_QUEUE, priority=keys.celery_priority(priority),
                   countdown=countdown or None)

    def run_jobs(self, jobs: list[tuple[str, int]]) -> None:
        """Send the run messages of many jobs (job_id, priority), pipelined: a batch file's chunk."""
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=len(jobs) or 1):
            for job_id, priority in jobs:
                self._send(keys.INFER_TASK, [job_id], keys.INFER_QUEUE, priority=keys.celery_priority(priority),
                           producer=producer)

    def announce(self, transition: Transition) -> bool:
        """Send the notify a transition owes, if it owes one (the state machine decided)."""
        if not transition.notify:
            return False
        try:
            self._send(keys.NOTIFY_TASK, [transition.job_id, transition.notify], keys.CALLBACKS_QUEUE)
        except Exception as exc:  # noqa: BLE001 - the owed callback is indexed; the sweeper re-sends it
            log.warning("notify.send_failed", job_id=transition.job_id, event=transition.notify, error=str(exc))
            return False
        return True

    def resend_notify(self, job_id: str, event: str) -> None:
        """The sweeper's repair of a notify message that was lost or never ran."""
        self._send(keys.NOTIFY_TASK, [job_id, event], keys.CALLBACKS_QUEUE)

    def deliver(self, delivery: dict[str, Any], *, countdown: float | None = None) -> None:
        """Queue one more attempt of a callback delivery (a retry, or a replay of a dead one)."""
        self._send(keys.CALLBACK_TASK, [delivery], keys.CALLBACKS_QUEUE, countdown=countdown or None)

    def _send(self, task: str, args: list[Any], queue: str, **options: Any) -> None:
        self.app.send_task(task, args=args, queue=queue, retry=True, retry_policy=PUBLISH_RETRY, **options)
