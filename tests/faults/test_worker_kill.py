"""SIGKILL a worker with jobs in flight: another worker finishes them, each exactly once.

Proves: no job lost, exactly one result object per job in the store, one
terminal callback per job, when a worker dies without any chance to clean up
(OOM kill, node loss). Recovery comes from the job records: expired leases
are requeued by the surviving worker's sweeper, and queued jobs whose Celery
message sat unacked in the dead worker are re-sent after the visibility
timeout.
"""

from __future__ import annotations

import time
from collections import Counter

from api_client import JobRequest, keys
from api_client.webhooks import generate_secret
from tests.faults.common import keys_without_ttl, record, wait_all
from tests.faults.netfaults import WebhookReceiver

JOBS = 100
MIN_IN_FLIGHT = 50  # jobs submitted and not yet finished when the worker dies


def test_sigkill_with_jobs_in_flight_every_job_succeeds_exactly_once(s3_server, redis_srv, client, spawn):
    bucket = "kill-results"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    # Versioning makes every PUT visible, so a second result write cannot hide.
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    secret = generate_secret()
    receiver = WebhookReceiver(secret)
    settings = dict(store_url=f"s3://{bucket}/ivq", s3_endpoint_url=s3_server.endpoint_url, max_batch_size=4,
                    max_wait_ms=50, lease_s=3, visibility_timeout_s=15, webhook_secret=secret,
                    callback_allow_private=True, callback_backoff_base_s=0.2,
                    # A notify the victim had taken is owed in its shard's notify index; the survivor's sweeper
                    # re-sends it after this (kombu's own redelivery can take longer than the wait).
                    callback_resend_after_s=5)
    victim, survivor = spawn("victim", **settings), spawn("survivor", **settings)
    victim.wait_ready(redis_srv.url)
    survivor.wait_ready(redis_srv.url)

    ids = client.submit_many(
        JobRequest.simple(f"job {i}", generation={"max_new_tokens": 48}, callback={"url": receiver.url})
        for i in range(JOBS))
    r = client.redis
    # Kill once the victim has finished a batch and holds other jobs mid-run.
    deadline = time.monotonic() + 90
    while True:
        states = [(r.hget(keys.job(j), "state") or b"").decode() for j in ids]
        owners = [(r.hget(keys.job(j), "worker_id") or b"").decode() for j in ids]
        running_on_victim = [j for j, s, o in zip(ids, states, owners, strict=True) if s == "running" and o == "victim"]
        done_by_victim = sum(1 for s, o in zip(states, owners, strict=True) if s == "succeeded" and o == "victim")
        if running_on_victim and done_by_victim >= 1:
            break
        assert time.monotonic() < deadline, "the victim never held a job mid-run"
        time.sleep(0.05)
    t_kill = time.time()
    victim.kill()
    # Re-read after the kill: a job can finish between the snapshot above and the kill.
    states = [(r.hget(keys.job(j), "state") or b"").decode() for j in ids]
    owners = [(r.hget(keys.job(j), "worker_id") or b"").decode() for j in ids]
    running_on_victim = [j for j, s, o in zip(ids, states, owners, strict=True) if s == "running" and o == "victim"]
    in_flight = len(running_on_victim)
    queued_at_kill = states.count("queued")
    unfinished = sum(1 for s in states if s in ("queued", "running"))
    assert unfinished >= MIN_IN_FLIGHT, f"only {unfinished} jobs in flight at the kill"

    final = wait_all(client, ids, timeout=150)
    recovered_s = max(s.finished_at for s in final.values()) - t_kill
    assert Counter(s.state.value for s in final.values()) == {"succeeded": JOBS}, \
        {j: (s.state.value, s.error) for j, s in final.items() if s.state.value != "succeeded"}

    # Jobs the victim was running were taken over after their lease expired.
    taken_over = [j for j in running_on_victim if final[j].worker_id == "survivor"]
    assert len(taken_over) == in_flight
    lease_requeues = sum(1 for j in ids for ev in client.jobs.events(j) if ev.get("retry_of") == "lease_expired")
    assert lease_requeues >= in_flight

    # Exactly one current result object per job, and it is the recorded one.
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="ivq/results/", MaxKeys=1000)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"ivq/results/internal/{j}.json" for j in ids)
    versions = Counter(v["Key"] for v in s3.list_object_versions(Bucket=bucket, Prefix="ivq/results/")["Versions"])
    rewritten = sum(1 for n in versions.values() if n > 1)
    for j in ids:
        stored = client.result(j)
        assert stored is not None and stored.job_id == j and stored.worker_id == final[j].worker_id

    # One terminal callback per job (a retried delivery keeps its webhook-id).
    deadline = time.monotonic() + 60
    while len(receiver.terminal_ids_by_job()) < JOBS and time.monotonic() < deadline:
        time.sleep(0.2)
    terminal = receiver.terminal_ids_by_job()
    assert set(terminal) == set(ids)
    assert all(v == {(f"msg_{j}_succeeded", "job.succeeded")} for j, v in terminal.items())
    deliveries = receiver.snapshot()
    callbacks_done_s = max(d.at for d in deliveries) - t_kill
    assert all(d.verified for d in deliveries)
    receiver.close()
    assert keys_without_ttl(client.redis)[0] == []  # every service key still has a TTL
    record(f"sigkill: {JOBS} jobs, {unfinished} unfinished at the kill ({in_flight} running on the victim, "
           f"{queued_at_kill} queued); succeeded "
           f"{JOBS}, lost 0, results rewritten {rewritten}, terminal callbacks {len(terminal)} "
           f"(raw POSTs {len(deliveries)}); last job done {recovered_s:.1f}s and last callback "
           f"{callbacks_done_s:.1f}s after the kill")
