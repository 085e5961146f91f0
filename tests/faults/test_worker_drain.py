"""SIGTERM a worker mid-batch: the batch in flight completes, the rest go back to the queue.

This is what a Kubernetes rollout or a scale-down does. The drained worker
must exit within IVQ_DRAIN_TIMEOUT_S (plus a little slack for interpreter
shutdown), count no attempt for the jobs it hands back, and lose none: the
other worker finishes them.
"""

from __future__ import annotations

import time
from collections import Counter

from api_client import JobRequest, keys
from tests.faults.common import record, wait_all

JOBS = 40
DRAIN_TIMEOUT_S = 10
SLACK_S = 5


def test_sigterm_finishes_the_batch_in_flight_and_hands_back_the_rest(redis_srv, client, spawn):
    settings = dict(max_batch_size=4, max_wait_ms=50, lease_s=5, visibility_timeout_s=30,
                    drain_timeout_s=DRAIN_TIMEOUT_S)
    leaving, staying = spawn("leaving", **settings), spawn("staying", **settings)
    leaving.wait_ready(redis_srv.url)
    staying.wait_ready(redis_srv.url)

    ids = client.submit_many(JobRequest.simple(f"drain {i}", generation={"max_new_tokens": 160})
                             for i in range(JOBS))
    r = client.redis
    deadline = time.monotonic() + 90
    while True:  # wait until the leaving worker has finished a batch and is running more
        rows = [r.hmget(keys.job(j), "state", "worker_id") for j in ids]
        rows = [((s or b"").decode(), (w or b"").decode()) for s, w in rows]
        running = [j for j, (s, w) in zip(ids, rows, strict=True) if s == "running" and w == "leaving"]
        if running and ("succeeded", "leaving") in rows:
            break
        assert time.monotonic() < deadline, "the leaving worker never ran a second batch"
        time.sleep(0.05)
    t_term = time.time()
    exit_s = leaving.terminate(timeout=DRAIN_TIMEOUT_S + 60)
    assert leaving.returncode == 0, leaving.tail()
    assert exit_s <= DRAIN_TIMEOUT_S + SLACK_S, f"drain took {exit_s:.1f}s"

    final = wait_all(client, ids, timeout=180)
    assert Counter(s.state.value for s in final.values()) == {"succeeded": JOBS}, \
        {j: (s.state.value, s.error) for j, s in final.items() if s.state.value != "succeeded"}
    # The batch in flight completed on the leaving worker, after SIGTERM.
    finished_in_drain = [j for j in running if final[j].worker_id == "leaving" and final[j].finished_at > t_term]
    assert finished_in_drain, "no job of the in-flight batch completed during the drain"
    # Everything it had claimed but not yet batched went back, uncounted, and the other worker ran it.
    handed_back = [j for j in ids if any(ev.get("retry_of") == "draining" for ev in client.jobs.events(j))]
    assert all(final[j].worker_id == "staying" for j in handed_back)
    assert all(s.attempts == 1 for s in final.values()), {j: s.attempts for j, s in final.items() if s.attempts != 1}
    record(f"sigterm: {JOBS} jobs, {len(running)} running on the worker at SIGTERM, {len(finished_in_drain)} "
           f"completed in the drain, {len(handed_back)} handed back uncounted; succeeded {JOBS}, lost 0; "
           f"exit {exit_s:.1f}s after SIGTERM (limit {DRAIN_TIMEOUT_S}s + {SLACK_S}s)")
