"""Restart Redis (AOF on) with jobs queued and running: nothing is lost, everyone reconnects.

While Redis is down the client raises BrokerUnavailable within seconds (it
never hangs); once it is back, the worker's Celery consumer, its sweeper and
lease renewer, and the client all reconnect by themselves, and every job
submitted before, during (refused) and after the outage ends correctly.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from api_client import BrokerUnavailable, JobRequest, keys
from tests.faults.common import keys_without_ttl, record, wait_all

JOBS = 30
OUTAGE_S = 4.0
FAIL_FAST_S = 15.0


def test_redis_restart_loses_nothing_and_client_fails_fast_while_down(redis_srv, client, spawn):
    worker = spawn("steady", max_batch_size=4, max_wait_ms=50, lease_s=10, visibility_timeout_s=20)
    worker.wait_ready(redis_srv.url)
    before = client.submit_many(JobRequest.simple(f"before {i}", generation={"max_new_tokens": 96})
                                for i in range(JOBS))
    r = client.redis
    deadline = time.monotonic() + 60
    while True:  # restart with some jobs running and some still queued
        states = Counter((r.hget(keys.job(j), "state") or b"").decode() for j in before)
        if states["running"] and states["queued"] and states["succeeded"]:
            at_restart = dict(states)
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.05)

    t_down = time.monotonic()
    redis_srv.stop()  # SIGTERM: redis-server flushes its AOF and exits
    refusals = {}
    for name, call in (("submit", lambda: client.submit(JobRequest.simple("during outage"))),
                       ("status", lambda: client.status(before[0])),
                       ("wait", lambda: client.wait(before[0], timeout=30))):
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            call()
        refusals[name] = time.monotonic() - t0
    assert max(refusals.values()) < FAIL_FAST_S, refusals
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
    redis_srv.start()  # same port and directory: the AOF is replayed
    outage_s = time.monotonic() - t_down

    after = client.submit_many(JobRequest.simple(f"after {i}", generation={"max_new_tokens": 8}) for i in range(5))
    final = wait_all(client, before + after, timeout=150)
    states = Counter(s.state.value for s in final.values())
    assert states == {"succeeded": JOBS + 5}, \
        {j: (s.state.value, s.error) for j, s in final.items() if s.state.value != "succeeded"}
    assert worker.alive()
    assert keys_without_ttl(client.redis)[0] == []  # every service key still has a TTL
    # An outage shorter than the lease costs no re-run and counts no crash: the
    # claim holders finish their jobs once Redis is back.
    retried = sum(1 for j in before if final[j].attempts > 1)
    crashes = sum(int(client.jobs.raw(j).get("crashes", 0)) for j in before)
    assert (retried, crashes) == (0, 0)
    record(f"redis restart: {JOBS} jobs before (at the restart: {at_restart}), outage {outage_s:.1f}s, 5 after; "
           f"succeeded {JOBS + 5}, lost 0, re-run after the outage {retried}; client refused in "
           + ", ".join(f"{k} {v:.2f}s" for k, v in refusals.items()))

