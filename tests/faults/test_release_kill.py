"""SIGKILL the process releasing batch jobs, again and again, mid-release: every batch job
still runs, exactly once.

A release is: take.lua moves job ids from a tenant's backlog into its lane (marked taken,
not sent), the messages go, the marks become "sent". A releaser killed between the two
leaves taken marks; a later round (here a fresh releaser) sends those jobs again after
IVQ_BATCH_RESEND_TAKEN_S. A message sent twice is harmless: the fenced claim runs a job once.
The worker's own releaser is kept out of the way (IVQ_BATCH_RELEASE_S=3600) so that only the
process being killed releases.
"""

from __future__ import annotations

import random
import time

from api_client import JobRequest, keys
from api_client.counters import Counters
from api_client.lanes import Lanes
from api_client.jobstate import JobStore
from tests.faults.common import keys_without_ttl, record
from tests.faults.procs import WorkerProc, worker_env

PER_TENANT = 100
TENANTS = ("a", "b")
KILLS = 6


def _create_batches(jobs: JobStore, lanes: Lanes) -> dict[str, list[str]]:
    created = {}
    for tenant in TENANTS:
        request = JobRequest.simple("x", generation={"max_new_tokens": 1}).model_dump_json(exclude_none=True)
        ids = [jobs.new_job_id(None) for _ in range(PER_TENANT)]
        jobs.create_many([(j, request) for j in ids], now=time.time(), priority=keys.BATCH_PRIORITY, tenant=tenant,
                         batch_id=f"batch_{tenant}")
        lanes.push(tenant, ids)
        created[tenant] = ids
    return created


def _lane_scores(r) -> list[float]:
    return [score for t in TENANTS for _, score in r.zrange(keys.TenantKeys.of(t).lane, 0, -1, withscores=True)]


def _wait_for_a_release(r, *, since: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(abs(score) >= since for score in _lane_scores(r)):
        assert time.monotonic() < deadline, "the releaser released nothing"
        time.sleep(0.01)


def _taken_unsent(r, *, since: float) -> int:
    return sum(1 for score in _lane_scores(r) if score < 0 and -score >= since)


def test_a_releaser_killed_mid_release_loses_no_job_and_runs_none_twice(redis_srv, client, spawn, model_cache,
                                                                      tmp_path):
    jobs, lanes = JobStore(client.redis), Lanes(client.redis, lane_jobs=20)
    created = _create_batches(jobs, lanes)
    # One release cut short for certain: 20 of a's jobs taken into its lane, no message sent.
    lanes._take_all(["a"], time.time())
    assert client.redis.zcard(keys.TenantKeys.of("a").lane) == 20

    worker = spawn("kill-worker", max_batch_size=4, concurrency=8, lease_s=3, batch_release_s=3600)
    worker.wait_ready(redis_srv.url)
    env = worker_env(redis_url=redis_srv.url, data_dir=tmp_path / "data", model_cache_dir=model_cache,
                     batch_lane_jobs=20, batch_resend_taken_s=1)
    rng, left_taken = random.Random(19), 0
    for n in range(KILLS):
        releaser = WorkerProc(env, tmp_path / "logs", f"releaser-{n}", command=("-m", "tests.faults.releaser"))
        started = time.time()
        releaser.start()
        _wait_for_a_release(client.redis, since=started)  # it is past its start-up and releasing
        time.sleep(rng.uniform(0, 0.05))
        releaser.kill()
        left_taken += _taken_unsent(client.redis, since=started)
    last = WorkerProc(env, tmp_path / "logs", "releaser-last", command=("-m", "tests.faults.releaser")).start()
    try:
        all_ids = [j for ids in created.values() for j in ids]
        deadline = time.monotonic() + 240
        while True:
            states = [jobs.state(j) for j in all_ids]
            if all(s == "succeeded" for s in states):
                break
            assert time.monotonic() < deadline, {s: states.count(s) for s in set(states)}
            time.sleep(0.5)
    finally:
        last.stop()
    claims = [int(jobs.raw(j)["attempts"]) for j in all_ids]
    running_events = [sum(e["state"] == "running" for e in jobs.events(j)) for j in all_ids]
    record(f"release under SIGKILL: {KILLS} releasers killed mid-round, {left_taken} jobs left taken but not sent "
           f"by them (plus 20 cut short on purpose); {len(all_ids)} jobs, each claimed "
           f"{min(claims)}..{max(claims)} time(s)")
    assert claims == [1] * len(all_ids) and running_events == [1] * len(all_ids)
    for tenant in TENANTS:
        assert Counters(client.redis).batch(f"batch_{tenant}") == {
            "queued": 0, "running": 0, "succeeded": PER_TENANT, "failed": 0, "cancelled": 0}
        assert client.redis.llen(keys.TenantKeys.of(tenant).backlog) == 0
    assert keys_without_ttl(client.redis)[0] == []  # backlogs, lanes, counters: each expires
