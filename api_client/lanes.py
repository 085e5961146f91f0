"""Batch lanes: each tenant's batch jobs wait in its own backlog and are released to the
workers in turns, so one tenant's 50,000 lines do not hold the batch queue.

    API:       records created (lua/create.lua, not indexed as queued) ─► Lanes.push: tenant's backlog
    releaser:  every round, for each tenant with a backlog (keys.BATCH_TENANTS), in turn:
               tidy its lane (released jobs no longer queued leave it), take.lua moves jobs from the
               backlog into the lane until it holds `lane_jobs`, then one message each, interleaved
               across tenants (A1 B1 C1 A2 B2 ...), at batch priority: after every interactive job.

A tenant therefore has at most `lane_jobs` batch jobs waiting in the broker at a time; a
tenant that arrives later waits behind those, not behind the whole of another's batch.

Nothing is lost or run twice across a release. take.lua marks what it moved "taken, not
sent" (score: minus the time) in the tenant's slot, atomically with the pop; the releaser
marks it sent once the messages went. A releaser killed in between leaves the marks, and a
later round (any worker's) sends those jobs after `resend_taken_s`. A released job whose
message is lost later (a Redis crash, a failover) is sent again once it has been in the lane
`resend_sent_s` with no message in the broker (`present`, api_client/broker_scan.py; one
still waiting is marked seen, and looked for again `resend_sent_s` later). A duplicate message is harmless:
the fenced claim (lua/claim.lua) runs a job once.
"""

from __future__ import annotations

import time
from importlib import resources
from collections.abc import Callable
from itertools import zip_longest
from typing import Any

from api_client import keys
from api_client.dispatch import Dispatcher
from api_client.jobstate import as_text

_TAKE = f"local JOB_TTL = {keys.JOB_TTL_S}\n" + (resources.files("api_client") / "lua" / "take.lua").read_text()
FORGET_TENANT_AFTER_S = 60.0  # a tenant leaves the round this long after its last push, once all is released


class Lanes:
    def __init__(self, client: Any, dispatch: Dispatcher | None = None, *, lane_jobs: int = 16,
                 resend_taken_s: float = 5.0, resend_sent_s: float = 3600.0,
                 present: Callable[[set[str]], set[str]] | None = None):
        self.redis = client
        self.dispatch = dispatch  # the releaser's; the API only pushes
        self.lane_jobs = lane_jobs
        self.resend_taken_s = resend_taken_s
        self.resend_sent_s = resend_sent_s
        self.present = present
        self._take = client.register_script(_TAKE)
        self._turn = 0

    # ---- the API's side -----------------------------------------------------
    def push(self, tenant: str, job_ids: list[str]) -> None:
        """Append created batch jobs to the tenant's backlog (the tenant joins the round first)."""
        if not job_ids:
            return
        self.redis.zadd(keys.BATCH_TENANTS, {tenant: time.time()})
        self.redis.expire(keys.BATCH_TENANTS, keys.JOB_TTL_S)
        k = keys.TenantKeys.of(tenant)
        self.redis.rpush(k.backlog, *job_ids)
        self.redis.expire(k.backlog, keys.JOB_TTL_S)

    def backlog(self, tenants: list[str]) -> dict[str, tuple[int, int]]:
        """tenant -> (jobs in its backlog, jobs in its lane), one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            k = keys.TenantKeys.of(tenant)
            pipe.llen(k.backlog)
            pipe.zcard(k.lane)
        values = pipe.execute()
        return {t: (int(values[2 * i]), int(values[2 * i + 1])) for i, t in enumerate(tenants)}

    # ---- the releaser -------------------------------------------------------
    def release_once(self, only: list[str] | None = None) -> int:
        """One round over every tenant with batch work (or the tenants `only`); returns how many
        messages it sent. The API runs one for the tenant it just pushed for, so the first lane
        reaches the broker's lists at once: that is what KEDA sees, and it wakes a fleet at zero."""
        if self.dispatch is None:
            raise RuntimeError("releasing needs a Dispatcher")
        now = time.time()
        tenants = only or [as_text(t) for t in self.redis.zrange(keys.BATCH_TENANTS, 0, -1, withscores=False)]
        if not tenants:
            return 0
        self._turn = (self._turn + 1) % len(tenants)
        tenants = tenants[self._turn:] + tenants[:self._turn]  # who goes first rotates too
        lanes = self._read_lanes(tenants)
        resend = self._tidy(tenants, lanes, now)
        taken = self._take_all(tenants, now)
        turns = zip_longest(*[[(t, j) for j in ids] for t, ids in zip(tenants, taken, strict=True)])
        order = resend + [pair for turn in turns for pair in turn if pair is not None]
        if order:
            self.dispatch.run_jobs([(job_id, keys.BATCH_PRIORITY) for _, job_id in order])
            self._mark_sent(order, now)
        if only is None:
            self._forget_idle(tenants, lanes, taken, now)
        return len(order)

    def _read_lanes(self, tenants: list[str]) -> list[list[tuple[str, float]]]:
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zrange(keys.TenantKeys.of(tenant).lane, 0, -1, withscores=True)
        return [[(as_text(m), float(s)) for m, s in members] for members in pipe.execute()]

    def _tidy(self, tenants: list[str], lanes: list[list[tuple[str, float]]],
              now: float) -> list[tuple[str, str]]:
        """Released jobs no longer queued leave their lane; returns those whose message must go again."""
        members = [(tenant, job_id, score) for tenant, lane in zip(tenants, lanes, strict=True)
                   for job_id, score in lane]
        if not members:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for _, job_id, _ in members:
            pipe.hget(keys.job(job_id), "state")
        states = [as_text(s) for s in pipe.execute()]
        pipe, resend, sent_long_ago = self.redis.pipeline(transaction=False), [], []
        for (tenant, job_id, score), state in zip(members, states, strict=True):
            lane = keys.TenantKeys.of(tenant).lane
            if state != "queued":
                pipe.zrem(lane, job_id)  # claimed, ended or gone
            elif score < 0 and -score < now - self.resend_taken_s:
                resend.append((tenant, job_id))  # taken by a releaser that died before sending
            elif 0 < score < now - self.resend_sent_s:
                sent_long_ago.append((tenant, job_id))  # its message may be lost
        waiting = self.present({j for _, j in sent_long_ago}) if self.present and sent_long_ago else set()
        for tenant, job_id in sent_long_ago:
            if job_id in waiting:
                pipe.zadd(keys.TenantKeys.of(tenant).lane, {job_id: now}, xx=True)  # seen in the broker now
            else:
                resend.append((tenant, job_id))
        pipe.execute()
        return resend

    def _take_all(self, tenants: list[str], now: float) -> list[list[str]]:
        """One take.lua per tenant (not pipelined: a cluster pipeline cannot carry scripts)."""
        taken = []
        for tenant in tenants:
            k = keys.TenantKeys.of(tenant)
            taken.append([as_text(j) for j in self._take(keys=[k.backlog, k.lane], args=[self.lane_jobs, repr(now)])])
        return taken

    def _mark_sent(self, sent: list[tuple[str, str]], now: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for tenant, job_id in sent:
            pipe.zadd(keys.TenantKeys.of(tenant).lane, {job_id: now}, xx=True)  # XX: not if it left meanwhile
        pipe.execute()

    def _forget_idle(self, tenants: list[str], lanes: list[list[tuple[str, float]]], taken: list[list[str]],
                     now: float) -> None:
        """A tenant whose backlog and lane are empty leaves the round, a while after its last push."""
        idle = [t for t, lane, took in zip(tenants, lanes, taken, strict=True) if not lane and not took]
        if not idle:
            return
        scores = self.redis.zmscore(keys.BATCH_TENANTS, idle)
        for tenant, (backlog, lane_size) in self.backlog(idle).items():
            score = scores[idle.index(tenant)]
            if backlog == 0 and lane_size == 0 and score is not None and score < now - FORGET_TENANT_AFTER_S:
                self.redis.zrem(keys.BATCH_TENANTS, tenant)
