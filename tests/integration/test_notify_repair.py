"""A callback an event owes is recorded with the transition itself, so a lost
notify message is sent again by the sweeper, and forgotten once its task ran."""

from __future__ import annotations

import base64
import json
import time

from api_client import JobClient, JobRequest, keys
from api_client.jobstate import JobStore
from worker.celery_app import create_app
from worker.runtime import WorkerRuntime
from worker.settings import Settings


def _callback_messages(redis_client) -> list[list]:
    """The task args of every message waiting on the callbacks queue (kombu: base64 JSON body)."""
    bodies = [json.loads(m)["body"] for m in redis_client.lrange(keys.CALLBACKS_QUEUE, 0, -1)]
    return [json.loads(base64.b64decode(b))[0] for b in bodies]


def test_lost_notify_is_resent_from_the_record_then_forgotten(redis_url, redis_client, tmp_path):
    client = JobClient(redis_url)
    request = JobRequest.simple("x", callback={"url": "http://127.0.0.1:9/hook"})
    job_id = client.submit(request)
    redis_client.delete(*keys.infer_queue_lists())  # nobody runs it: we drive the transitions by hand
    jobs = JobStore(redis_client, worker_id="w1", lease_s=30, max_crashes=2)
    owed = keys.JobKeys.of(job_id).shard.notify
    claimed = jobs.claim(job_id)
    assert claimed.notify is None and redis_client.zcard(owed) == 0  # "running" was not asked for
    ended = jobs.succeed(claimed.claim, {"output_preview": "ok"})
    assert ended.done and ended.notify == "succeeded"
    # The transition recorded the owed callback even though no notify message was ever sent.
    assert redis_client.zrange(owed, 0, -1) == [f"{job_id}|succeeded".encode()]
    assert redis_client.ttl(owed) > 0

    settings = Settings(redis_url=redis_url, data_dir=tmp_path, callback_resend_after_s=0.0,
                        callback_allow_private=True, callback_max_attempts=2, webhook_secret="whsec_" + "A" * 44)
    app = create_app(settings)
    runtime = WorkerRuntime(settings, dispatch=app.ivq_dispatch, load_model=False)
    time.sleep(0.01)
    assert runtime.resend_lost_notifies() == 1
    assert _callback_messages(redis_client) == [[job_id, "succeeded"]]

    # The notify task runs (the receiver is down: a retry is scheduled) and the debt is cleared.
    outcome = app.tasks[keys.NOTIFY_TASK].run(job_id, "succeeded")
    assert outcome.startswith("retry")
    assert redis_client.zcard(owed) == 0
    assert b'ivq_callbacks_total{outcome="retry"} 1.0' in app.ivq_metrics.render()
    client.close()


def test_cancel_records_the_owed_cancelled_callback(redis_url, redis_client):
    client = JobClient(redis_url)
    job_id = client.submit(JobRequest.simple("x", callback={"url": "https://example.invalid/h",
                                                            "events": ["cancelled"]}))
    client.cancel(job_id)
    owed = keys.JobKeys.of(job_id).shard.notify
    assert redis_client.zrange(owed, 0, -1) == [f"{job_id}|cancelled".encode()]
    client.close()
