"""The webhook receiver is down (connection refused), then answers 503, then recovers.

Every event is still delivered, every request verifies with
api_client.webhooks.verify, and each retry of one event carries the same
webhook-id (so a receiver can de-duplicate). Nothing is dead-lettered.
"""

from __future__ import annotations

import time
from collections import defaultdict

from api_client import JobRequest
from api_client.webhooks import generate_secret
from tests.faults.common import record, wait_all
from tests.faults.netfaults import WebhookReceiver
from worker.jobs.callbacks import list_dead

JOBS = 12
DOWN_S = 4.0
FAIL_503 = 15
ALL_EVENTS = ["running", "succeeded", "failed", "cancelled"]


def test_callbacks_survive_a_receiver_outage_with_stable_ids(redis_srv, client, spawn, tmp_path):
    secret = generate_secret()
    receiver = WebhookReceiver(secret)
    receiver.down()
    t_down = time.monotonic()
    worker = spawn("hooks", webhook_secret=secret, callback_allow_private=True, callback_backoff_base_s=0.25,
                   callback_backoff_cap_s=3, callback_max_attempts=12, max_batch_size=4, max_wait_ms=50)
    worker.wait_ready(redis_srv.url)

    cb = {"url": receiver.url, "events": ALL_EVENTS}
    ids = client.submit_many(JobRequest.simple(f"hook {i}", generation={"max_new_tokens": 4}, callback=cb)
                             for i in range(JOBS))
    missing = f"file://{(tmp_path / 'data' / 'store' / 'nope.jpg').resolve()}"
    failed = client.submit(JobRequest.simple("fails", images=[missing], callback=cb))
    cancelled = "hook-cancelled"
    client.jobs.create(cancelled, JobRequest.simple("never runs", callback=cb).model_dump_json(),
                                 now=time.time(), priority=0, deadline=None, idempotency_key=None)
    client.cancel(cancelled)
    final = wait_all(client, [*ids, failed], timeout=60)
    assert all(final[j].state.value == "succeeded" for j in ids) and final[failed].state.value == "failed"

    time.sleep(DOWN_S)  # every job has ended; its callbacks keep failing for a while longer
    down_s = time.monotonic() - t_down
    receiver.fail_next = FAIL_503  # up again, but answering 503 for a while
    receiver.up()
    expected = {(j, "running") for j in ids} | {(j, "succeeded") for j in ids}
    expected |= {(failed, "running"), (failed, "failed"), (cancelled, "cancelled")}
    deadline = time.monotonic() + 90
    while True:
        delivered = {(d.job_id, d.event_type.removeprefix("job.")) for d in receiver.snapshot() if d.status < 300}
        if expected <= delivered or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected - delivered == set(), f"never delivered: {sorted(expected - delivered)[:5]}"

    posts = receiver.snapshot()
    assert all(d.verified for d in posts)
    ids_per_event: dict[tuple[str, str], set[str]] = defaultdict(set)
    tries: dict[tuple[str, str], int] = defaultdict(int)
    for d in posts:
        key = (d.job_id, d.event_type.removeprefix("job."))
        ids_per_event[key].add(d.webhook_id)
        tries[key] += 1
    assert all(v == {f"msg_{j}_{e}"} for (j, e), v in ids_per_event.items())  # stable across retries
    assert sum(1 for d in posts if d.status == 503) == FAIL_503
    assert list_dead(client.redis) == []
    receiver.close()
    retried = sum(1 for n in tries.values() if n > 1)
    record(f"webhook outage: {len(expected)} events for {JOBS + 2} jobs; receiver refused connections for "
           f"{down_s:.0f}s then answered 503 x{FAIL_503}; delivered {len(expected)}/{len(expected)}, "
           f"{len(posts)} POSTs seen, {retried} events needed >1 POST, all signatures verified, one webhook-id "
           f"per event, dead-lettered 0")
