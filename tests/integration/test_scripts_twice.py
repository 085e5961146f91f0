"""Every script is safe to run twice: redis-py retries a command whose reply was lost, and a retried
EVALSHA runs again. Each transition runs once, then again with the very same KEYS and ARGV; the
second run must leave the record, its events, the shard's indexes and counters, and the tenant's
keys exactly as the first left them. A SCRIPT FLUSH (what a failover or a restart looks like to
the scripts: Redis 7 neither replicates nor persists SCRIPT LOAD) costs nothing either.
"""

from __future__ import annotations

import time
import uuid

import pytest

from api_client import JobRequest, keys
from api_client.jobstate import JobStore
from api_client.quotas import Limits, Quotas

HOOK = {"url": "https://hooks.example.com/x", "events": ["running", "succeeded", "failed", "cancelled"]}


@pytest.fixture
def jobs(redis_client):
    redis_client.flushdb()
    return JobStore(redis_client, worker_id="w1", lease_s=30, max_crashes=3)


def _snapshot(r, job_id: str, tenant: str = "internal") -> dict:
    k = keys.JobKeys.of(job_id)
    t = keys.TenantKeys.of(tenant)
    return {
        "record": r.hgetall(k.record), "events": r.lrange(k.events, 0, -1), "counts": r.hgetall(k.shard.counts),
        **{name: r.zscore(getattr(k.shard, name), job_id) for name in ("leases", "queued", "deadlines")},
        "notify": r.zrange(k.shard.notify, 0, -1, withscores=True),
        "idem": [r.get(key) for key in r.scan_iter(match="*:idem:*")],
        "active": r.zrange(t.active, 0, -1, withscores=True), "bucket": r.hgetall(t.bucket),
        "held": r.hgetall(t.held), "batch_bucket": r.hgetall(t.batch_bucket),
    }


def _twice(jobs: JobStore, name: str, job_id: str, *args, extra_keys: tuple[str, ...] = ()) -> tuple:
    first = jobs.run(name, job_id, *args, extra_keys=extra_keys)
    after_first = _snapshot(jobs.redis, job_id)
    second = jobs.run(name, job_id, *args, extra_keys=extra_keys)
    assert _snapshot(jobs.redis, job_id) == after_first, f"{name} changed something when run again"
    return first, second


def _create_args(job_id: str, now: float, idempotency_key: str | None = None, batch_id: str = "") -> tuple:
    request = JobRequest.simple("x", callback=HOOK).model_dump_json(exclude_none=True)
    scoped = f"internal/{idempotency_key}" if idempotency_key else "-"
    return ((repr(now), request, 3, repr(now + 600), keys.JOB_TTL_S, "1" if idempotency_key else "0",
             keys.IDEMPOTENCY_TTL_S, "internal", batch_id), (keys.idempotency(scoped, keys.shard_of(job_id)),))


def _created(jobs: JobStore, **kw) -> str:
    job_id = jobs.new_job_id(kw.get("idempotency_key"))
    args, extra = _create_args(job_id, time.time(), **kw)
    jobs.run("create", job_id, *args, extra_keys=extra)
    return job_id


@pytest.mark.parametrize("idempotency_key,batch_id", [(None, ""), ("order-1", ""), (None, "batch_x")])
def test_create_twice_creates_once_and_says_created_both_times(jobs, idempotency_key, batch_id):
    job_id = jobs.new_job_id(idempotency_key)
    args, extra = _create_args(job_id, time.time(), idempotency_key, batch_id)
    first, second = _twice(jobs, "create", job_id, *args, extra_keys=extra)
    assert first == second == [1, job_id.encode()]  # the retry still reports "created": the message goes


def test_claim_twice_hands_the_same_claim_back(jobs):
    job_id = _created(jobs)
    now = time.time()
    first, second = _twice(jobs, "claim", job_id, "w1", "token-1", repr(now), repr(now + 30), 3)
    assert first[0] == second[0] == b"claimed" and first[1] == second[1] == 1 and first[3:] == second[3:]


@pytest.mark.parametrize("name", ["renew", "progress", "succeed", "fail", "requeue"])
def test_a_holders_transition_twice_changes_nothing_more(jobs, name):
    job_id = _created(jobs)
    claim = jobs.claim(job_id).claim
    now = time.time()
    args = {"renew": (claim.token, repr(now + 30)),
            "progress": (claim.token, 3, "abc", repr(now)),
            "succeed": (claim.token, repr(now), '{"result": "{}", "output_preview": "x"}'),
            "fail": (claim.token, repr(now), "internal", "boom"),
            "requeue": (claim.token, repr(now), "1", "retry")}[name]
    _twice(jobs, name, job_id, *args)


@pytest.mark.parametrize("state", ["queued", "running"])
def test_cancel_twice_cancels_once(jobs, state):
    job_id = _created(jobs)
    if state == "running":
        jobs.claim(job_id)
    first, second = _twice(jobs, "cancel", job_id, repr(time.time()))
    assert first[0] == 1 and second[0] == 0


def test_expire_and_sweep_twice_change_nothing_more(jobs, redis_client):
    late = _created(jobs)
    redis_client.hset(keys.job(late), "deadline", repr(time.time() - 1))
    _twice(jobs, "expire", late, repr(time.time()))
    assert jobs.state(late) == "failed"
    crashed = _created(jobs)
    jobs.claim(crashed)
    now = time.time() + 60  # its lease ran out
    first, _ = _twice(jobs, "sweep", crashed, repr(now), 3, repr(now - 30))
    assert first[0] == b"requeued" and jobs.raw(crashed)["crashes"] == "1"  # one crash, not two
    stale = _created(jobs)
    first, second = _twice(jobs, "sweep", stale, repr(now), 3, repr(now - 30))
    assert (first[0], second[0]) == (b"resend", b"queued")  # one re-send, not two


def test_withdraw_twice_withdraws_once(jobs, redis_client):
    job_id = _created(jobs, idempotency_key="order-9")
    idem = keys.idempotency("internal/order-9", keys.shard_of(job_id))
    first, second = _twice(jobs, "withdraw", job_id, extra_keys=(idem,))
    assert (first, second) == (1, 0)
    assert not jobs.exists(job_id) and redis_client.get(idem) is None
    assert all(int(v) == 0 for v in redis_client.hgetall(keys.JobKeys.of(job_id).shard.counts).values())


def test_admission_twice_takes_one_token_and_one_holding(redis_client):
    redis_client.flushdb()
    quotas, limits, now = Quotas(redis_client), Limits(rate_per_s=1, burst=5), time.time()
    job_id, batch_id = uuid.uuid4().hex, "batch_" + uuid.uuid4().hex
    t = keys.TenantKeys.of("acme")
    args = [job_id, repr(now), limits.max_active, limits.rate_per_s, limits.burst]
    quotas._admit(keys=[t.active, t.bucket], args=args)
    after = _snapshot(redis_client, job_id, "acme")
    assert quotas._admit(keys=[t.active, t.bucket], args=args) == [1]
    assert _snapshot(redis_client, job_id, "acme") == after
    batch_args = [batch_id, repr(now), 10, 1000, 100, 10**6, 1, 5]
    quotas._admit_batch(keys=[t.batch_bucket, t.held], args=batch_args)
    after = _snapshot(redis_client, job_id, "acme")
    assert quotas._admit_batch(keys=[t.batch_bucket, t.held], args=batch_args) == [1]
    assert _snapshot(redis_client, job_id, "acme") == after


def test_scripts_reload_after_script_flush(jobs, redis_client):
    """NOSCRIPT (a failed-over or restarted Redis has no scripts): redis-py's Script loads it again,
    directly and in a pipeline."""
    job_id = _created(jobs)
    redis_client.script_flush()
    assert jobs.claim(job_id).outcome == "claimed"
    redis_client.script_flush()
    created = jobs.create_many([(uuid.uuid4().hex, JobRequest.simple("y").model_dump_json())], now=time.time(),
                               priority=0, tenant="internal", batch_id="")
    assert created[0].done
