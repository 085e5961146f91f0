"""Per-tenant admission: submit-rate token buckets and caps on jobs not yet ended.

Every script here runs on the tenant's own keys (`keys.TenantKeys`, one hash tag
per tenant), so a refused submit takes nothing and enqueues nothing.

- Interactive jobs (`admit`, lua/admit.lua): a token bucket and `max_active`. The cap
  counts the tenant's jobs that may still be queued or running: the job scripts live
  on the jobs' slots and cannot touch the tenant's set, so a job that ended is removed
  lazily, when the set is full: `admit` then reads the members' states (one pipelined
  round trip), forgets those that ended and tries once more.
- Batches (`admit_batch`, lua/admit_batch.lua): a bucket of batch submits, and caps on
  the batch jobs and their request bytes held (`max_batch_jobs`, `max_batch_bytes`). A
  batch holds its lines from admission on; when a submit would pass a cap, the holdings
  are first brought down to the batches' live jobs, counted exactly by the job
  transitions (api_client/counters.py, lua/unhold.lua), and the submit tried once more.
  A holding only ever shrinks to a count read after its batch was fully created, so the
  caps are never passed.
- SSE streams (`open_stream`, lua/stream.lua): at most `max_streams` per tenant over
  every API process; each open stream renews its entry, a dead process's entries lapse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from api_client import keys
from api_client.counters import Counters
from api_client.errors import QuotaExceeded, RateLimited
from api_client.jobstate import as_text


# What one queued batch job costs Redis besides its request JSON (record fields, event, backlog and
# line entries, counters): 1,985 bytes with a 303-byte request, benchmarks/tenants_bench.py memory.
JOB_OVERHEAD_BYTES = 2048


@dataclass(frozen=True)
class Limits:
    max_active: int = 1000  # interactive jobs queued or running at once
    rate_per_s: float = 20.0  # sustained submits per second
    burst: int = 40  # submits allowed at once after a quiet spell
    max_batch_jobs: int = 100_000  # batch jobs not yet ended, every batch of the tenant together
    max_batch_bytes: int = 256 * 1024 * 1024  # their requests' bytes in Redis (JOB_OVERHEAD_BYTES each included)
    batch_rate_per_s: float = 0.5  # sustained batch submits per second
    batch_burst: int = 5
    max_streams: int = 100  # open SSE streams


def _lua(name: str) -> str:
    return f"local JOB_TTL = {keys.JOB_TTL_S}\n" + (resources.files("api_client") / "lua" / f"{name}.lua").read_text()


_ADMIT = _lua("admit")


class Quotas:
    def __init__(self, client: Any):
        self.redis = client
        self._admit = client.register_script(_ADMIT)
        self._admit_batch = client.register_script(_lua("admit_batch"))
        self._unhold = client.register_script(_lua("unhold"))
        self._stream = client.register_script(_lua("stream"))

    def admit(self, tenant: str, job_id: str, limits: Limits, *, now: float) -> None:
        """Count one submit against the tenant; raises RateLimited or QuotaExceeded (with retry_after_s)."""
        _admitted(lambda: self._admit(keys=self._keys(tenant), args=[job_id, repr(now), limits.max_active,
                                                                      limits.rate_per_s, limits.burst]),
                  lambda: self.forget_ended(tenant) > 0,
                  rate=f"tenant {tenant!r} over {limits.rate_per_s:g} submits/s",
                  quota=f"tenant {tenant!r} has {limits.max_active} jobs queued or running")

    def release(self, tenant: str, job_id: str) -> None:
        """The job ended, or was never created (a repeated idempotency key)."""
        self.redis.zrem(keys.TenantKeys.of(tenant).active, job_id)

    def forget_ended(self, tenant: str) -> int:
        """Drop the tenant's jobs that have ended (or expired) from its active set; returns how many."""
        active = keys.TenantKeys.of(tenant).active
        members = [as_text(m) for m in self.redis.zrange(active, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in members:
            pipe.hget(keys.job(job_id), "state")
        ended = [j for j, state in zip(members, pipe.execute(), strict=True)
                 if as_text(state) not in ("queued", "running")]
        if ended:
            self.redis.zrem(active, *ended)
        return len(ended)

    # ---- batches ---------------------------------------------------------
    def admit_batch(self, tenant: str, batch_id: str, jobs: int, request_bytes: int, limits: Limits, *,
                    now: float) -> None:
        """Hold `jobs` batch jobs (and their bytes) for a new batch; RateLimited or QuotaExceeded."""
        held_bytes = request_bytes + jobs * JOB_OVERHEAD_BYTES
        k = keys.TenantKeys.of(tenant)
        _admitted(lambda: self._admit_batch(keys=[k.batch_bucket, k.held], args=[
                      batch_id, repr(now), jobs, held_bytes, limits.max_batch_jobs, limits.max_batch_bytes,
                      limits.batch_rate_per_s, limits.batch_burst]),
                  lambda: bool(self.unhold_ended(tenant)),
                  rate=f"tenant {tenant!r} over {limits.batch_rate_per_s:g} batch submits/s",
                  quota=f"tenant {tenant!r} would pass {limits.max_batch_jobs} batch jobs or "
                        f"{limits.max_batch_bytes} bytes held with {jobs} more")

    def drop_batch(self, tenant: str, batch_id: str) -> None:
        """An admitted batch that was never created (it failed on the way): its holding goes."""
        self._unhold(keys=[keys.TenantKeys.of(tenant).held], args=[batch_id, 0])

    def unhold_ended(self, tenant: str) -> int:
        """Bring each fully created batch's holding down to its live jobs; returns how many jobs it freed."""
        held_key = keys.TenantKeys.of(tenant).held
        held = {as_text(f): int(as_text(v)) for f, v in self.redis.hgetall(held_key).items()}
        batch_ids = [f for f in held if f not in ("jobs", "bytes") and not f.startswith("bytes:")]
        counters, args, freed = Counters(self.redis), [], 0
        for batch_id in batch_ids:
            state = as_text(self.redis.hget(keys.BatchKeys.of(batch_id).record, "state"))
            if state == "submitting":
                continue  # still being created: its counters have not caught up
            counts = counters.batch(batch_id) if state else {}
            left = counts.get("queued", 0) + counts.get("running", 0)
            if left < held[batch_id]:
                args += [batch_id, left]
                freed += held[batch_id] - left
        if args:
            self._unhold(keys=[held_key], args=args)
        return freed

    def held(self, tenant: str) -> tuple[int, int]:
        """(batch jobs, bytes) the tenant's batches hold now."""
        jobs, held_bytes = self.redis.hmget(keys.TenantKeys.of(tenant).held, "jobs", "bytes")
        return int(as_text(jobs) or 0), int(as_text(held_bytes) or 0)

    # ---- event streams ------------------------------------------------
    def open_stream(self, tenant: str, stream_id: str, limits: Limits, *, now: float, lapse_s: float) -> None:
        """Count one open SSE stream (or renew it); QuotaExceeded past `max_streams`."""
        k = keys.TenantKeys.of(tenant).streams
        if not self._stream(keys=[k], args=[stream_id, repr(now), repr(now + lapse_s), limits.max_streams]):
            raise QuotaExceeded(f"tenant {tenant!r} has {limits.max_streams} event streams open",
                                retry_after_s=lapse_s)

    def streams(self, tenant: str, *, now: float) -> int:
        """The tenant's open streams (not lapsed)."""
        return int(self.redis.zcount(keys.TenantKeys.of(tenant).streams, now, "+inf"))

    def close_stream(self, tenant: str, stream_id: str) -> None:
        self.redis.zrem(keys.TenantKeys.of(tenant).streams, stream_id)

    def active(self, tenant: str) -> int:
        return int(self.redis.zcard(keys.TenantKeys.of(tenant).active))

    @staticmethod
    def _keys(tenant: str) -> list[str]:
        k = keys.TenantKeys.of(tenant)
        return [k.active, k.bucket]


def _admitted(run: Callable[[], Any], free_ended: Callable[[], bool], *, rate: str, quota: str) -> None:
    """Run an admission script; when the quota refuses, free what has ended and try once more.
    Raises RateLimited or QuotaExceeded with the script's retry-after."""
    for attempt in (1, 2):
        reply = run()
        if reply[0]:
            return
        code, retry_after = as_text(reply[1]), float(as_text(reply[2]))
        if code == "rate_limited":
            raise RateLimited(rate, retry_after_s=retry_after)
        if attempt == 1 and free_ended():
            continue
        raise QuotaExceeded(quota, retry_after_s=retry_after)
