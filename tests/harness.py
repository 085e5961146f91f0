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


@contextmanager
def serving(app: object) -> Iterator[str]:
    """Serve an ASGI app with a real uvicorn on a free loopback port; yields its base URL."""
    import threading
    import time

    import uvicorn

    from worker.embedded import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
