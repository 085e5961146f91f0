"""Messages land in exactly the queue they are sent to, from both the producer's and the worker's app."""

from __future__ import annotations

from api_client import keys
from api_client.dispatch import Dispatcher, producer_app
from worker.celery_app import create_app
from worker.settings import Settings


def _lengths(redis_client) -> dict[str, int]:
    infer = sum(redis_client.llen(q) for q in keys.infer_queue_lists())  # one list per priority step
    return {keys.INFER_QUEUE: infer, keys.CALLBACKS_QUEUE: redis_client.llen(keys.CALLBACKS_QUEUE)}


def _declare_worker_queues(redis_url: str) -> None:
    """What a consuming worker does at start: declare its queues and their bindings."""
    app = create_app(Settings(redis_url=redis_url))
    with app.connection() as conn:
        for queue in app.amqp.queues.values():
            queue(conn.default_channel).declare()


def test_producer_and_worker_apps_route_each_task_to_one_queue(redis_url, redis_client):
    for app in (producer_app(redis_url), create_app(Settings(redis_url=redis_url))):
        redis_client.flushdb()
        _declare_worker_queues(redis_url)
        dispatch = Dispatcher(app)
        dispatch.run_job("job-a")
        assert _lengths(redis_client) == {keys.INFER_QUEUE: 1, keys.CALLBACKS_QUEUE: 0}
        dispatch.resend_notify("job-a", "succeeded")
        assert _lengths(redis_client) == {keys.INFER_QUEUE: 1, keys.CALLBACKS_QUEUE: 1}
        dispatch.deliver({"webhook_id": "msg_x"})
        assert _lengths(redis_client) == {keys.INFER_QUEUE: 1, keys.CALLBACKS_QUEUE: 2}


def test_priorities_use_the_documented_sub_queues(redis_url, redis_client):
    dispatch = Dispatcher(producer_app(redis_url))
    dispatch.run_job("urgent", 9)
    dispatch.run_job("normal", 0)
    lists = {name: redis_client.llen(name) for name in keys.infer_queue_lists()}
    assert sum(lists.values()) == 2
    assert lists[keys.INFER_QUEUE] == 1  # most urgent lands in the list served first


def test_batch_jobs_queue_behind_interactive_ones(redis_url, redis_client):
    redis_client.flushdb()
    assert keys.celery_priority(keys.BATCH_PRIORITY) > max(keys.celery_priority(p) for p in range(10))
    dispatch = Dispatcher(producer_app(redis_url))
    dispatch.run_job("a-batch-job", keys.BATCH_PRIORITY)
    dispatch.run_job("an-interactive-job", 0)
    dispatch.run_job("an-urgent-job", 9)
    lengths = {q: redis_client.llen(q) for q in keys.infer_queue_lists()}
    assert lengths == {"infer": 1, "infer:3": 0, "infer:6": 1, "infer:9": 1}  # "infer:9" is served last
