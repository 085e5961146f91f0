"""The baseline the service is measured against: a plain Celery task that runs one `generate` per job.

What one would write first: a Celery app (threads pool, concurrency 1, the
model resident in the process) whose task takes the job's request, reads its
media from the file store, decodes it, builds the prompt and calls
`model.generate` for that job alone (the static `Engine.generate_batch` of
one item), then returns the text and the completion tokens through Celery's
result backend. No batching, no job records, no events. It runs on the same
redis-server as the service (its own database number and queue) and the same
loaded model, so the two are compared on equal terms.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

QUEUE = "baseline"


def _own_db(redis_url: str, db: int = 1) -> str:
    """The same server, another database: the baseline's messages and results stay apart."""
    base, _, last = redis_url.rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{redis_url.rstrip('/')}/{db}"


def create_baseline_app(redis_url: str, *, loaded: Any, store: Any, media_limits: Any, max_tiles: int = 12) -> Any:
    from celery import Celery

    from api_client.schema import ImageItem, JobRequest
    from model_runtime.engine import Engine
    from model_runtime.media import decode_image, decode_video
    from model_runtime.prompts import prepare
    from worker.jobs.translate import chat_of, sampling_of

    url = _own_db(redis_url)
    app = Celery("ivq-baseline", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_default_queue=QUEUE, worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)
    engine = Engine(loaded, max_batch_size=1)

    @app.task(name="baseline.generate")
    def generate(request_json: str) -> dict[str, Any]:
        request = JobRequest.model_validate_json(request_json)
        media = {}
        for item in request.media_items():
            image = isinstance(item, ImageItem)
            data = store.fetcher.get_bytes(item.url, max_bytes=media_limits.max_image_bytes if image
                                   else media_limits.max_video_bytes)
            media[item.url] = (decode_image(data, media_limits) if image
                               else decode_video(data, media_limits, item.num_frames))
        prepared = prepare(loaded.processor, chat_of(request), media, sampling_of(request.generation),
                           request_id="baseline", max_tiles=max_tiles, context_length=loaded.context_length)
        output = engine.generate_batch([prepared])[0]
        if isinstance(output, BaseException):
            raise RuntimeError(f"baseline generate failed: {output!r}")
        return {"text": output.text, "completion_tokens": output.completion_tokens}

    app.baseline_task = generate
    return app


def _share_tasks(source: Any, target: Any) -> None:
    for name, task in list(source.tasks.items()):
        if not name.startswith("celery.") and name not in target.tasks:
            target.tasks.register(task)


class CeleryBaseline:
    """`with CeleryBaseline(redis_url, ..., alongside=service_app) as baseline: baseline.run(requests)`.

    Celery expects one worker app per process, and this worker runs beside the
    service's (`alongside`) so both use the one loaded model. Three
    process-wide pieces of Celery make two workers trip over each other:
    - the kombu event loop: a worker adopts the current one
      (celery.worker.components.Hub.create); this one gets its own and the
      service's stays current;
    - the app the threads pool runs tasks through (`current_app`, which the
      last started worker sets process-wide): each app also knows the other's
      tasks, whose results still go to their own backend;
    - stopping: leaving `start_worker` stops every worker of the process
      (celery.worker.state.should_terminate), so leave this one only when the
      service stops too (`Service.attach`).
    """

    def __init__(self, redis_url: str, *, loaded: Any, store: Any, media_limits: Any, max_tiles: int = 12,
                 alongside: Any = None) -> None:
        self.app = create_baseline_app(redis_url, loaded=loaded, store=store, media_limits=media_limits,
                                       max_tiles=max_tiles)
        self.alongside = alongside
        self._stack = ExitStack()

    def __enter__(self) -> CeleryBaseline:
        from celery import current_app
        from celery.contrib.testing.worker import start_worker
        from kombu.asynchronous import get_event_loop, set_event_loop

        service_hub = get_event_loop()
        service_app = self.alongside or current_app._get_current_object()
        _share_tasks(service_app, self.app)
        _share_tasks(self.app, service_app)

        def restore() -> None:
            set_event_loop(service_hub)
            service_app.set_current()
            service_app.set_default()

        self._stack.callback(restore)
        set_event_loop(None)
        try:
            self._stack.enter_context(start_worker(
                self.app, pool="threads", concurrency=1, perform_ping_check=False, queues=[QUEUE],
                shutdown_timeout=60, loglevel="WARNING",
            ))
        except BaseException:
            self._stack.close()
            raise
        finally:
            restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.app.close()

    def run(self, requests: list, timeout_s: float = 1800) -> dict[str, Any]:
        """Submit every job at once; tokens/s from the first submit to the last result."""
        task = self.app.baseline_task
        started = time.perf_counter()
        pending = [task.apply_async(args=[r.model_dump_json()], queue=QUEUE) for r in requests]
        results = [p.get(timeout=timeout_s) for p in pending]
        wall = time.perf_counter() - started
        for p in pending:
            p.forget()
        tokens = sum(r["completion_tokens"] for r in results)
        return {"jobs": len(results), "seconds": round(wall, 4), "jobs_per_s": round(len(results) / wall, 4),
                "tokens": tokens, "tokens_per_s": round(tokens / wall, 2)}
