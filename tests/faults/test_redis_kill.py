"""SIGKILL a single Redis (AOF, appendfsync everysec) under load, restart it in place 1 s later, and
do it again, several times: every acknowledged job succeeds, once, and the worker stays up.

The rounds catch what one kill rarely shows: a job whose record survived but whose Celery message
did not (it stays `queued` with attempts 0 until the sweeper finds no message for it in the
broker and sends one again, within 1.5 x IVQ_RESEND_LOST_AFTER_S), and kombu's own errors on the
dead connection (the ack of a message taken before the kill), which must not end the worker.
The process is killed, not the machine: the kernel keeps what Redis wrote, so nothing
acknowledged may vanish here (RELIABILITY.md says what an OS crash loses).
"""

from __future__ import annotations

import time

from api_client import JobRequest
from tests.faults.common import record
from tests.faults.ledger import Producer, settle

ROUNDS = 4
RUN_BEFORE_KILL_S = 2.0
DOWN_S = 1.0
RESEND_LOST_AFTER_S = 3
LONG_TOKENS = 300
LONG_JOBS = 12  # more than the batch holds: some wait in the worker, unacked, at the kill


def test_redis_sigkill_rounds_lose_nothing_and_the_worker_stays_up(redis_srv, client, spawn):
    worker = spawn("steady", max_batch_size=8, max_wait_ms=20, lease_s=6, visibility_timeout_s=60,
                   resend_lost_after_s=RESEND_LOST_AFTER_S)
    worker.wait_ready(redis_srv.url)
    producer = Producer(lambda n: client.submit(JobRequest.simple(f"kill {n}", generation={"max_new_tokens": 4})))
    long_jobs: list[str] = []
    outages: list[float] = []
    orphans: list[str] = []
    try:
        for round_ in range(ROUNDS):
            if round_ == 1:  # the first kill meets a worker with only long jobs in flight, fresh from its start
                producer.start()
            # Jobs that run for seconds: mid-run at the kill, their late acks meet a closed connection.
            long_jobs += [client.submit(JobRequest.simple(f"long {i}", generation={
                "max_new_tokens": LONG_TOKENS, "min_new_tokens": LONG_TOKENS})) for i in range(LONG_JOBS)]
            time.sleep(RUN_BEFORE_KILL_S)
            t_down = time.monotonic()
            redis_srv.kill()
            time.sleep(DOWN_S)
            redis_srv.start()  # same port and directory: the AOF is replayed
            outages.append(time.monotonic() - t_down)
            # What the AOF's last second can lose: a record whose message did not survive. Made
            # here on purpose, so the re-send is exercised every run, not only when the kill hits it.
            orphans.append(_record_without_message(client))
        time.sleep(RUN_BEFORE_KILL_S)
    finally:
        producer.stop()
    t_last = time.monotonic()
    bound = 1.5 * RESEND_LOST_AFTER_S + 60  # the re-send bound, plus room to run what waits on two cores
    result, _ = settle(client.redis, producer.acked + long_jobs + orphans, timeout=bound)
    # An orphan waits for its re-send, then in the queue like every job: its lateness is what it waited
    # beyond the longest wait of the jobs submitted within a second of it.
    started = {j: _times(client, j) for j in producer.acked + orphans}
    late = [started[o][1] - started[o][0] - max((b - a for a, b in (started[j] for j in producer.acked)
                                                 if abs(a - started[o][0]) < 1), default=0.0) for o in orphans]
    assert worker.alive(), f"the worker exited with {worker.returncode}:\n{worker.tail()}"
    record(f"redis SIGKILL x{ROUNDS} (AOF everysec, back after {DOWN_S:.0f}s): {result}, refused submits "
           f"{producer.refused}, outages {', '.join(f'{o:.1f}s' for o in outages)}, all done "
           f"{time.monotonic() - t_last:.1f}s after the last restart; worker up; a record without its message "
           f"started at most {max(late):.1f}s later than its neighbours "
           f"(re-send bound {1.5 * RESEND_LOST_AFTER_S:.1f}s)")
    assert not producer.unexpected, producer.unexpected[:5]
    assert result["acknowledged"] > 100
    assert (result["lost"], result["failed"], result["duplicates"], result["not_done"]) == (0, 0, 0, 0), result
    assert max(late) < 1.5 * RESEND_LOST_AFTER_S + 2, late


def _times(client, job_id: str) -> tuple[float, float]:
    rec = client.jobs.raw(job_id)
    return float(rec["created_at"]), float(rec.get("started_at") or "inf")


def _record_without_message(client) -> str:
    job_id = client.jobs.new_job_id(None)
    client.jobs.create(job_id, JobRequest.simple("orphan", generation={"max_new_tokens": 4}).model_dump_json(),
                       now=time.time(), priority=0, deadline=None, idempotency_key=None)
    return job_id


def test_a_worker_started_while_redis_is_down_waits_not_ready_then_serves(redis_srv, client, spawn):
    """A pod started during a failover waits (backoff, /readyz 503) instead of exiting into a crash loop."""
    import httpx

    from worker.ops.embedded import free_port

    redis_srv.stop()
    port = free_port()
    worker = spawn("patient", metrics_port=port)
    deadline = time.monotonic() + 60
    while "worker.redis_unreachable" not in worker.tail(20000):  # its client's own retries, then the wait
        assert worker.alive(), worker.tail()  # until now the worker exited with 1 here
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)
    time.sleep(3)
    assert worker.alive(), worker.tail()
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503
    redis_srv.start()
    waited = worker.wait_ready(redis_srv.url)
    job_id = client.submit(JobRequest.simple("after the wait", generation={"max_new_tokens": 4}))
    assert client.wait(job_id, timeout=60).state.value == "succeeded"
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    record(f"worker started with Redis down: alive and not ready for {waited:.1f}s, then served")
