"""Run a real Celery worker (threads pool, the real runtime) inside the test process.

The worker consumes from the session's real redis-server; the model is the
tiny random-weight checkpoint, so output text is gibberish by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery.contrib.testing.worker import start_worker

from worker.celery_app import create_app, start_runtime
from worker.settings import Settings


@contextmanager
def running_worker(settings: Settings) -> Iterator[object]:
    app = create_app(settings)
    runtime = start_runtime(app)
    try:
        with start_worker(app, pool="threads", concurrency=settings.resolved_concurrency,
                          perform_ping_check=False, queues=settings.queues, shutdown_timeout=60,
                          loglevel="WARNING"):
            yield runtime
    finally:
        runtime.stop()

