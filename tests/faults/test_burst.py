"""A burst of 2,000 tiny-model jobs: all succeed, every service key has a TTL, memory stays bounded.

Text-only prompts and max_new_tokens=1 keep the model's share small, so this
measures the service around it: Redis transitions, Celery messages, the
micro-batcher, result writes, events. Worker RSS is sampled after a warm-up
burst and again after the big one; the growth bound is loose on purpose
(allocator arenas and caches settle), it catches a leak per job, not noise.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from api_client import JobRequest, keys
from tests.faults.common import keys_without_ttl, record

WARMUP_JOBS = 200
BURST_JOBS = 2000
MAX_RSS_GROWTH_MB = 150


def submit_and_drain(client, n: int, tag: str, timeout: float) -> tuple[list[str], float, float]:
    """Submit n jobs, wait until all are terminal; returns (ids, submit seconds, total seconds)."""
    t0 = time.monotonic()
    ids = client.submit_many(JobRequest.simple(f"{tag} {i % 50}", generation={"max_new_tokens": 1})
                             for i in range(n))
    t_submitted = time.monotonic()
    r = client.redis
    deadline = t0 + timeout
    pending = list(ids)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} of {n} jobs not done after {timeout}s"
        pipe = r.pipeline(transaction=False)
        for j in pending:
            pipe.hget(keys.job(j), "state")
        states = pipe.execute()
        pending = [j for j, s in zip(pending, states, strict=True) if s not in (b"succeeded", b"failed", b"cancelled")]
        if pending:
            time.sleep(0.25)
    return ids, t_submitted - t0, time.monotonic() - t0


@pytest.mark.slow
def test_burst_of_2000_jobs(redis_srv, client, spawn):
    worker = spawn("burst", max_batch_size=32, max_wait_ms=20, concurrency=64, lease_s=30)
    worker.wait_ready(redis_srv.url)

    submit_and_drain(client, WARMUP_JOBS, "warm-up", timeout=120)
    rss_before = worker.rss_bytes()
    ids, submit_s, total_s = submit_and_drain(client, BURST_JOBS, "burst", timeout=300)
    rss_after = worker.rss_bytes()

    states = Counter()
    batch_sizes = []
    pipe = client.redis.pipeline(transaction=False)
    for j in ids:
        pipe.hmget(keys.job(j), "state", "attempts", "batch_size")
    for state, attempts, batch_size in pipe.execute():
        states[(state.decode(), int(attempts))] += 1
        batch_sizes.append(int(batch_size or 0))
    assert states == {("succeeded", 1): BURST_JOBS}, states

    ours, broker = keys_without_ttl(client.redis)
    assert ours == [], f"service keys without a TTL: {ours[:10]}"
    growth_mb = (rss_after - rss_before) / 2**20
    assert growth_mb < MAX_RSS_GROWTH_MB, f"worker RSS grew {growth_mb:.0f} MB over {BURST_JOBS} jobs"
    assert worker.alive()
    record(f"burst: {BURST_JOBS} jobs (after {WARMUP_JOBS} warm-up), succeeded {BURST_JOBS}, lost 0, "
           f"retried 0; submitted in {submit_s:.1f}s ({BURST_JOBS / submit_s:.0f}/s), all done in {total_s:.1f}s "
           f"= {BURST_JOBS / total_s:.1f} jobs/s end to end; mean batch {sum(batch_sizes) / len(batch_sizes):.1f} "
           f"(max {max(batch_sizes)}); worker RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB "
           f"({growth_mb:+.0f} MB); service keys without TTL: 0; broker keys without TTL: {broker}")
