"""The waiting set (keys.WAITING) stays exact across a Redis SIGKILL under load.

Producers and a fake fleet drive every transition (create, batch create, claim,
requeue, fail, succeed, cancel) against a redis-server with AOF, as compose runs
it; the server gets SIGKILL mid-load and starts again from its AOF. Each script's
writes are one unit in the AOF, so whatever survives, the set's members are
exactly the jobs whose record says queued: no drift to repair.
"""

from __future__ import annotations

import random
import threading
import time

import redis

from api_client import keys
from api_client.jobstate import JobStore
from tests.faults.common import record
from tests.integration.test_waiting import REQUEST, queued_truth, waiting_members

ROUNDS = 3


def _churn(url: str, stop: threading.Event, seed: int) -> None:
    """Every transition, at random, until Redis goes away (or `stop`)."""
    rng = random.Random(seed)
    client = redis.Redis.from_url(url, socket_timeout=2)
    jobs = JobStore(client, worker_id=f"w{seed}", lease_s=30)
    mine: list[str] = []
    try:
        while not stop.is_set():
            roll = rng.random()
            if roll < 0.3 or not mine:
                job_id = jobs.new_job_id(None)
                jobs.create(job_id, REQUEST, now=time.time(), priority=0, deadline=None, idempotency_key=None)
                mine.append(job_id)
            elif roll < 0.4:
                ids = [jobs.new_job_id(None) for _ in range(20)]
                jobs.create_many([(j, REQUEST) for j in ids], now=time.time(), priority=keys.BATCH_PRIORITY,
                                 tenant="acme", batch_id=f"batch_{seed}")
                mine += ids
            elif roll < 0.5:
                jobs.cancel(rng.choice(mine))
            else:
                claim = jobs.claim(rng.choice(mine)).claim
                if claim is None:
                    continue
                end = rng.random()
                if end < 0.4:
                    jobs.succeed(claim, {"result": "{}"})
                elif end < 0.6:
                    jobs.fail(claim, "invalid_media", "bad")
                elif end < 0.9:
                    jobs.requeue(claim, "timeout", count_attempt=True)
                # else: left running, as a crashed worker leaves it
    except (redis.ConnectionError, redis.TimeoutError):
        pass  # the kill
    finally:
        client.close()


def test_the_waiting_set_is_exact_after_sigkill_under_load(redis_srv):
    rows = []
    for rnd in range(ROUNDS):
        stop = threading.Event()
        threads = [threading.Thread(target=_churn, args=(redis_srv.url, stop, 10 * rnd + i)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        redis_srv.kill()  # mid-script, for some of them
        stop.set()
        for t in threads:
            t.join(30)
        redis_srv.start()  # the AOF replays
        client = redis.Redis.from_url(redis_srv.url)
        truth, members = queued_truth(client), waiting_members(client)
        records = sum(1 for _ in client.scan_iter(match=keys.job_pattern(), count=1000))
        client.close()
        assert members == truth, (len(members), len(truth))
        rows.append(f"{records} records, {len(truth)} queued = ZCARD {len(members)}")
    record(f"waiting set after SIGKILL under load ({ROUNDS} kills, AOF): " + "; ".join(rows))
