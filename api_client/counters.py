"""Exact job counts per tenant and per batch, read in one round trip whatever their size.

The job transitions keep the counters themselves (api_client/lua/common.lua `count`),
in the same script as each change of state. A tenant's or a batch's jobs spread over
every shard (a job's shard comes from its id), and a script may touch only its job's
slot, so each shard holds its own share (`keys.ShardKeys.counts`) and a read sums the
`keys.SHARDS` shares: one pipelined HMGET per shard, the same commands for a 10-line
and a 50,000-line batch.
"""

from __future__ import annotations

from typing import Any

from api_client import keys
from api_client.jobstate import as_text

BATCH_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class Counters:
    def __init__(self, client: Any):
        self.redis = client

    def _sum(self, fields: list[str]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for shard in keys.all_shards():
            pipe.hmget(shard.counts, fields)
        totals = [0] * len(fields)
        for values in pipe.execute():
            for i, v in enumerate(values):
                totals[i] += int(as_text(v) or 0)
        return totals

    def tenant(self, tenant: str) -> dict[str, dict[str, int]]:
        """{kind: {state: jobs}} for kind in interactive, batch and state in queued, running."""
        fields = [keys.tenant_field(tenant, k, s) for k in keys.JOB_KINDS for s in keys.LIVE_STATES]
        values = iter(self._sum(fields))
        return {k: {s: next(values) for s in keys.LIVE_STATES} for k in keys.JOB_KINDS}

    def tenants(self, tenants: list[str]) -> dict[str, dict[str, dict[str, int]]]:
        """`tenant` for several tenants, still in one round trip."""
        fields = [keys.tenant_field(t, k, s) for t in tenants for k in keys.JOB_KINDS for s in keys.LIVE_STATES]
        values = iter(self._sum(fields)) if fields else iter(())
        return {t: {k: {s: next(values) for s in keys.LIVE_STATES} for k in keys.JOB_KINDS} for t in tenants}

    def batch(self, batch_id: str) -> dict[str, int]:
        """The batch's jobs by state."""
        return dict(zip(BATCH_STATES, self._sum([keys.batch_field(batch_id, s) for s in BATCH_STATES]), strict=True))

    def forget_batch(self, batch_id: str) -> None:
        """A finished batch's counters go (its results file holds the final counts)."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in keys.all_shards():
            pipe.hdel(shard.counts, *[keys.batch_field(batch_id, s) for s in BATCH_STATES])
        pipe.execute()
