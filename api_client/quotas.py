"""Per-tenant admission: a submit-rate token bucket and a cap on jobs not yet ended.

`Quotas.admit` runs the Lua script api_client/lua/admit.lua on the tenant's own
keys (`keys.TenantKeys`, one hash tag per tenant), so a refused submit takes
nothing and enqueues nothing. The cap counts the tenant's jobs that may still be
queued or running: the job scripts live on the jobs' slots and cannot touch the
tenant's set, so a job that ended is removed lazily, when the set is full:
`admit` then reads the members' states (one pipelined round trip), forgets those
that ended and tries once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from api_client import keys
from api_client.errors import QuotaExceeded, RateLimited
from api_client.jobstate import as_text


@dataclass(frozen=True)
class Limits:
    max_active: int = 1000  # jobs queued or running at once
    rate_per_s: float = 20.0  # sustained submits per second
    burst: int = 40  # submits allowed at once after a quiet spell


_ADMIT = f"local JOB_TTL = {keys.JOB_TTL_S}\n" + (resources.files("api_client") / "lua" / "admit.lua").read_text()


class Quotas:
    def __init__(self, client: Any):
        self.redis = client
        self._admit = client.register_script(_ADMIT)

    def admit(self, tenant: str, job_id: str, limits: Limits, *, now: float) -> None:
        """Count one submit against the tenant; raises RateLimited or QuotaExceeded (with retry_after_s)."""
        for attempt in (1, 2):
            reply = self._admit(keys=self._keys(tenant), args=[job_id, repr(now), limits.max_active,
                                                                limits.rate_per_s, limits.burst])
            if reply[0]:
                return
            code, retry_after = as_text(reply[1]), float(as_text(reply[2]))
            if code == "rate_limited":
                raise RateLimited(f"tenant {tenant!r} over {limits.rate_per_s:g} submits/s",
                                  retry_after_s=retry_after)
            if attempt == 1 and self.forget_ended(tenant):
                continue
            raise QuotaExceeded(f"tenant {tenant!r} has {limits.max_active} jobs queued or running",
                                retry_after_s=retry_after)

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

    def active(self, tenant: str) -> int:
        return int(self.redis.zcard(keys.TenantKeys.of(tenant).active))

    @staticmethod
    def _keys(tenant: str) -> list[str]:
        k = keys.TenantKeys.of(tenant)
        return [k.active, k.bucket]
