"""The scaling signal (keys.WAITING): a sorted set that holds exactly the jobs that wait.

After every step below, its members are compared with the truth, every job record whose
state is `queued` (read by SCAN): interactive jobs, a tenant's batch backlog beyond its
lane, the released lane, claims, cancels, expiries, failures and retries, a crashed
holder's requeue, and scripts run twice with the same arguments (a retried EVALSHA).
"""

from __future__ import annotations

import time

import pytest

from api_client import JobRequest, keys
from api_client.jobstate import JobStore, as_text
from api_client.lanes import Lanes
from tests.services import RedisClusterServers

REQUEST = JobRequest.simple("x").model_dump_json(exclude_none=True)


def queued_truth(client) -> set[str]:
    """Every job whose record says queued, wherever it waits."""
    ids = []
    for key in client.scan_iter(match=keys.job_pattern(), count=1000):
        ids.append(as_text(key).rpartition(":job:")[2])
    states = [as_text(s) for s in (client.hget(keys.job(j), "state") for j in ids)]
    return {j for j, s in zip(ids, states, strict=True) if s == "queued"}


def waiting_members(client, clustered: bool = False) -> set[str]:
    return {as_text(m) for key in keys.waiting_keys(clustered) for m in client.zrange(key, 0, -1)}


def check(jobs: JobStore, client, expected: int) -> None:
    truth = queued_truth(client)
    assert waiting_members(client, jobs.clustered) == truth
    assert jobs.waiting() == len(truth) == expected


def create(jobs: JobStore, *, deadline: float | None = None, tenant: str = keys.INTERNAL_TENANT) -> str:
    job_id = jobs.new_job_id(None)
    jobs.create(job_id, REQUEST, now=time.time(), priority=3, deadline=deadline, idempotency_key=None, tenant=tenant)
    return job_id


@pytest.fixture
def jobs(redis_client):
    return JobStore(redis_client, worker_id="w1", lease_s=30, max_crashes=2)


def test_the_waiting_set_is_exact_through_every_transition(jobs, redis_client):
    a, b = create(jobs), create(jobs)
    create(jobs, deadline=time.time() + 0.2)  # expires in the queue, below
    check(jobs, redis_client, 3)
    # A batch far beyond its lane: 40 lines, 8 released, 32 still in the tenant's backlog.
    lanes = Lanes(redis_client, lane_jobs=8)
    batch = [jobs.new_job_id(None) for _ in range(40)]
    jobs.create_many([(j, REQUEST) for j in batch], now=time.time(), priority=keys.BATCH_PRIORITY, tenant="acme",
                     batch_id="batch_1")
    lanes.push("acme", batch)
    taken = lanes._take_all(["acme"], time.time())[0]
    assert len(taken) == 8 and lanes.backlog(["acme"]) == {"acme": (32, 8)}
    check(jobs, redis_client, 43)
    claim_a = jobs.claim(a).claim  # claimed: no longer waits
    check(jobs, redis_client, 42)
    lane_claims = [jobs.claim(j).claim for j in taken[:3]]  # workers take from the released lane
    check(jobs, redis_client, 39)
    assert jobs.cancel(b).done and jobs.cancel(batch[-1]).done  # a queued job and a backlog line cancelled
    check(jobs, redis_client, 37)
    assert jobs.cancel(taken[0]).done  # a running batch job cancelled: it did not wait
    check(jobs, redis_client, 37)
    time.sleep(0.25)
    assert [t.outcome for t in jobs.sweep(resend_after_s=3600)] == ["expired"]  # c's deadline passed in the queue
    check(jobs, redis_client, 36)
    assert jobs.requeue(claim_a, "timeout", count_attempt=True)  # a retry: waits again
    check(jobs, redis_client, 37)
    claim_a = jobs.claim(a).claim
    assert jobs.fail(claim_a, "invalid_media", "bad").done
    assert jobs.succeed(lane_claims[1], {"result": "{}"}).done
    check(jobs, redis_client, 36)
    assert jobs.requeue(lane_claims[2], "draining", count_attempt=False)  # a drain hands it back
    check(jobs, redis_client, 37)


def test_a_crashed_holders_job_waits_again_and_a_poisoned_one_does_not(redis_client):
    jobs = JobStore(redis_client, worker_id="w1", lease_s=0.05, max_crashes=2)
    job_id = create(jobs)
    jobs.claim(job_id)
    check(jobs, redis_client, 0)
    time.sleep(0.1)
    assert [t.outcome for t in jobs.sweep(resend_after_s=3600)] == ["requeued"]
    check(jobs, redis_client, 1)
    jobs.claim(job_id)
    time.sleep(0.1)
    assert [t.outcome for t in jobs.sweep(resend_after_s=3600)] == ["poisoned"]
    check(jobs, redis_client, 0)


def test_scripts_run_twice_leave_the_set_exact(jobs, redis_client):
    """A retried EVALSHA may run a script a second time: the set holds members, not a count."""
    now = repr(time.time())
    job_id, batch_job = jobs.new_job_id(None), jobs.new_job_id(None)
    for _ in range(2):
        jobs.run("create", job_id, now, REQUEST, 3, "", keys.JOB_TTL_S, "0", keys.IDEMPOTENCY_TTL_S,
                 keys.INTERNAL_TENANT, "", extra_keys=(keys.idempotency("-", keys.shard_of(job_id)),))
        jobs.run("create", batch_job, now, REQUEST, keys.BATCH_PRIORITY, "", keys.JOB_TTL_S, "0",
                 keys.IDEMPOTENCY_TTL_S, "acme", "batch_2",
                 extra_keys=(keys.idempotency("-", keys.shard_of(batch_job)),))
    check(jobs, redis_client, 2)
    token, lease = "t1", repr(time.time() + 30)
    for _ in range(2):
        jobs.run("claim", job_id, "w1", token, now, lease, 2)
    check(jobs, redis_client, 1)
    for _ in range(2):
        jobs.run("requeue", job_id, token, repr(time.time()), "1", "timeout")
    check(jobs, redis_client, 2)
    for _ in range(2):
        jobs.run("cancel", batch_job, repr(time.time()))
    check(jobs, redis_client, 1)


def test_each_shard_keeps_its_share_on_a_redis_cluster(tmp_path):
    cluster = RedisClusterServers(tmp_path, nodes=3)
    try:
        client = cluster.client()
        jobs = JobStore(client, worker_id="w1", lease_s=30)
        assert jobs.clustered
        ids = [create(jobs) for _ in range(20)]
        jobs.claim(ids[0])
        jobs.cancel(ids[1])
        assert jobs.waiting() == 18 and waiting_members(client, clustered=True) == set(ids[2:])
        assert len({client.keyslot(k) for k in keys.waiting_keys(clustered=True)}) == keys.SHARDS
        client.close()
    finally:
        cluster.stop()
