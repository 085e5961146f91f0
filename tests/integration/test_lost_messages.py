"""A queued job whose Celery message is gone is sent again from its record, and only then.

The sweeper looks for each job queued longer than IVQ_RESEND_LOST_AFTER_S in the broker's lists
and kombu's `unacked` hash (api_client/broker_scan.py), with real messages sent by the real
producer: a job still waiting its turn is only marked seen; a job whose message vanished (as in a
Redis crash or with a failed-over primary) is re-sent, interactive and batch alike.
"""

from __future__ import annotations

import json
import time

import pytest

from api_client import JobRequest, keys
from api_client.broker_scan import messages_present
from api_client.dispatch import Dispatcher, producer_app
from api_client.jobstate import JobStore
from api_client.lanes import Lanes


@pytest.fixture
def dispatch(redis_url):
    app = producer_app(redis_url)
    yield Dispatcher(app)
    app.close()


def _queued(jobs: JobStore, now: float, *, batch_id: str = "") -> str:
    job_id = jobs.new_job_id(None)
    jobs.create(job_id, JobRequest.simple("x").model_dump_json(), now=now, priority=0, deadline=None,
                idempotency_key=None, tenant="acme" if batch_id else "internal", batch_id=batch_id)
    return job_id


def test_messages_present_finds_waiting_and_unacked_messages_only(redis_client, dispatch):
    jobs = JobStore(redis_client)
    waiting, held, abandoned, lost = (_queued(jobs, time.time()) for _ in range(4))
    dispatch.run_job(waiting, 9)  # an urgent one: its own priority list
    for job_id in (held, abandoned, lost):
        dispatch.run_job(job_id)
    # A worker took `held` just now (kombu moves it to `unacked`); `abandoned` was taken a minute ago by a
    # worker that never claimed it (its connection died with a failover); `lost` vanished with a crash.
    taken = {held: time.time(), abandoned: time.time() - 60}
    for name in keys.infer_queue_lists():
        for raw in redis_client.lrange(name, 0, -1):
            for job_id, at in taken.items():
                if job_id.encode() in raw:
                    redis_client.lrem(name, 1, raw)
                    redis_client.hset("unacked", f"tag-{job_id}", json.dumps([json.loads(raw), "infer", "infer"]))
                    redis_client.zadd("unacked_index", {f"tag-{job_id}": at})
            if lost.encode() in raw:
                redis_client.lrem(name, 1, raw)
    assert messages_present(redis_client, {waiting, held, abandoned, lost}, fresh_s=30) == {waiting, held}
    # A retry's message waits in `unacked` for its countdown: present however long ago it was taken.
    later = _queued(jobs, time.time())
    dispatch.run_job(later, countdown=120)
    (raw,) = [m for n in keys.infer_queue_lists() for m in redis_client.lrange(n, 0, -1) if later.encode() in m]
    redis_client.hset("unacked", "tag-later", json.dumps([json.loads(raw), "infer", "infer"]))
    redis_client.zadd("unacked_index", {"tag-later": time.time() - 60})
    redis_client.delete(*keys.infer_queue_lists())
    assert messages_present(redis_client, {later, abandoned}, fresh_s=30) == {later}


def test_sweep_resends_only_the_job_whose_message_is_gone(redis_client, dispatch):
    jobs = JobStore(redis_client)
    long_ago = time.time() - 60
    waiting, lost = _queued(jobs, long_ago), _queued(jobs, long_ago)
    dispatch.run_job(waiting)  # `lost` never got one: its message went with the crash
    present = lambda ids: messages_present(redis_client, ids)  # noqa: E731
    changed = jobs.sweep(resend_after_s=30, present=present)
    assert [(t.job_id, t.outcome) for t in changed] == [(lost, "resend")]
    shard = keys.JobKeys.of(waiting).shard
    assert redis_client.zscore(shard.queued, waiting) > long_ago + 50  # seen now: looked for again in 30 s
    assert jobs.sweep(resend_after_s=30, present=present) == []  # neither comes up again at once
    assert [t.outcome for t in jobs.sweep(resend_after_s=0, present=lambda ids: set())] == ["resend", "resend"]


def test_a_released_batch_job_whose_message_is_gone_is_sent_again(redis_client, dispatch):
    jobs = JobStore(redis_client)
    lanes = Lanes(redis_client, dispatch, lane_jobs=4, resend_sent_s=30,
                  present=lambda ids: messages_present(redis_client, ids))
    ids = [_queued(jobs, time.time(), batch_id="batch_1") for _ in range(2)]
    lanes.push("acme", ids)
    assert lanes.release_once() == 2
    lane = keys.TenantKeys.of("acme").lane
    for job_id in ids:  # released a minute ago
        redis_client.zadd(lane, {job_id: time.time() - 60}, xx=True)
    gone = ids[1]
    for raw in redis_client.lrange("infer:9", 0, -1):
        if gone.encode() in raw:
            redis_client.lrem("infer:9", 1, raw)
    assert lanes.release_once() == 1  # only the lost one goes again
    assert messages_present(redis_client, set(ids)) == set(ids)
    assert redis_client.zscore(lane, ids[0]) > time.time() - 5  # the waiting one is marked seen now
