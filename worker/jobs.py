"""The worker's side of the job state machine: claims, leases, fencing, sweeping.

Exactly one result per job despite at-least-once delivery:
- `claim` moves queued -> running atomically with a fresh claim token and a
  lease; a duplicate delivery of a job whose lease is live is dropped;
- `renew` extends the lease only for the claim holder;
- `finish` and `requeue` succeed only for the claim holder, so a worker that
  lost its claim (lease expired, job cancelled) cannot write a result;
- `sweep` (every worker runs it) puts jobs whose lease ran out back on the
  queue, counting a crash; after `max_crashes` the job ends failed `poison`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis

from api_client import keys
from api_client.records import LUA_COMMON, QUEUED_SET

_CLAIM = LUA_COMMON + """
-- KEYS: job, events ; ARGV: job_id, worker_id, token, now, lease_until, max_crashes
local st = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'deadline')
local state = st[1]
if not state then return {'missing', 0} end
if state ~= 'queued' and state ~= 'running' then return {'terminal', 0} end
local now = tonumber(ARGV[4])
if state == 'running' then
  if tonumber(st[2] or '0') > now then return {'busy', 0} end
  -- the previous holder's lease ran out before the sweeper saw it: a crash
  local crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1)
  if crashes >= tonumber(ARGV[6]) then
    end_job(KEYS[1], KEYS[2], ARGV[1], 'failed', ARGV[4], 'poison',
            'its worker died ' .. crashes .. ' times while running it')
    return {'poison', 0}
  end
end
if st[3] and st[3] ~= '' and tonumber(st[3]) < now then
  end_job(KEYS[1], KEYS[2], ARGV[1], 'failed', ARGV[4], 'expired', 'deadline passed before the job started')
  return {'expired', 0}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker_id', ARGV[2], 'claim', ARGV[3],
           'started_at', ARGV[4], 'lease_until', ARGV[5])
redis.call('ZADD', PREFIX .. ':leases', ARGV[5], ARGV[1])
redis.call('EXPIRE', PREFIX .. ':leases', %(ttl)d)
redis.call('ZREM', PREFIX .. ':queued', ARGV[1])
emit(KEYS[1], KEYS[2], ARGV[1], 'running', ARGV[4], {attempt = attempts, worker_id = ARGV[2]})
local rec = redis.call('HMGET', KEYS[1], 'request', 'queued_at', 'priority')
return {'claimed', attempts, rec[1], rec[2] or '', rec[3] or ''}
""" % {"ttl": keys.JOB_TTL_S}

_RENEW = LUA_COMMON + """
-- KEYS: job ; ARGV: job_id, token, lease_until
local st = redis.call('HMGET', KEYS[1], 'state', 'claim')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3])
redis.call('ZADD', PREFIX .. ':leases', ARGV[3], ARGV[1])
return 1
"""

_FINISH = LUA_COMMON + """
-- KEYS: job, events ; ARGV: job_id, token, now, state, fields_json, error_code, error_message
local st = redis.call('HMGET', KEYS[1], 'state', 'claim')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return {0, st[1] or ''} end
local fields = cjson.decode(ARGV[5])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
local code = nil
if ARGV[6] ~= '' then code = ARGV[6] end
end_job(KEYS[1], KEYS[2], ARGV[1], ARGV[4], ARGV[3], code, ARGV[7])
return {1, ARGV[4]}
"""

_REQUEUE = LUA_COMMON + """
-- KEYS: job, events ; ARGV: job_id, token, now, count_attempt, reason_code
local st = redis.call('HMGET', KEYS[1], 'state', 'claim')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
if ARGV[4] == '0' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at', ARGV[3], 'last_error_code', ARGV[5])
redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
redis.call('ZREM', PREFIX .. ':leases', ARGV[1])
redis.call('ZADD', PREFIX .. ':queued', ARGV[3], ARGV[1])
emit(KEYS[1], KEYS[2], ARGV[1], 'queued', ARGV[3], {retry_of = ARGV[5]})
return 1
"""

_SWEEP = LUA_COMMON + """
-- ARGV: now, max_crashes, resend_before, limit
local now = tonumber(ARGV[1])
local requeued, poisoned, resend = {}, {}, {}
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', PREFIX .. ':leases', '-inf', now, 'LIMIT', 0, ARGV[4])) do
  local jk, ek = PREFIX .. ':job:' .. jid, PREFIX .. ':events:' .. jid
  local st = redis.call('HMGET', jk, 'state', 'lease_until')
  if st[1] == 'running' and tonumber(st[2] or '0') <= now then
    local crashes = redis.call('HINCRBY', jk, 'crashes', 1)
    if crashes >= tonumber(ARGV[2]) then
      end_job(jk, ek, jid, 'failed', ARGV[1], 'poison', 'its worker died ' .. crashes .. ' times while running it')
      table.insert(poisoned, jid)
    else
      redis.call('HSET', jk, 'state', 'queued', 'queued_at', ARGV[1], 'last_error_code', 'lease_expired')
      redis.call('HDEL', jk, 'claim', 'lease_until')
      redis.call('ZADD', PREFIX .. ':queued', ARGV[1], jid)
      emit(jk, ek, jid, 'queued', ARGV[1], {retry_of = 'lease_expired'})
      table.insert(requeued, jid)
    end
  end
  redis.call('ZREM', PREFIX .. ':leases', jid)
end
-- queued jobs whose message may be lost: send another (a duplicate is dropped at claim)
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', PREFIX .. ':queued', '-inf', ARGV[3], 'LIMIT', 0, ARGV[4])) do
  if redis.call('HGET', PREFIX .. ':job:' .. jid, 'state') == 'queued' then
    redis.call('ZADD', PREFIX .. ':queued', ARGV[1], jid)
    table.insert(resend, jid)
  else
    redis.call('ZREM', PREFIX .. ':queued', jid)
  end
end
return {requeued, poisoned, resend}
"""


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    request_json: str
    queued_at: float
    priority: int
    callback_json: str | None


@dataclass(frozen=True)
class SweepResult:
    requeued: list[str]
    poisoned: list[str]
    resend: list[str]


class JobStore:
    """Worker-side transitions on job records. Every method is one atomic script."""

    def __init__(self, client: redis.Redis, *, worker_id: str, lease_s: float, max_crashes: int):
        self.redis = client
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_crashes = max_crashes
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._sweep = client.register_script(_SWEEP)

    def claim(self, job_id: str) -> tuple[str, Claim | None]:
        """Returns (outcome, claim): outcome is claimed|busy|terminal|missing|expired|poison."""
        token = uuid.uuid4().hex
        now = time.time()
        # The record comes back with the claim: a second round trip could fail after the
        # claim succeeded and strand the job as `running` until its lease expires.
        outcome, attempt, *rec = self._claim(
            keys=[keys.job(job_id), keys.events(job_id)],
            args=[job_id, self.worker_id, token, repr(now), repr(now + self.lease_s), self.max_crashes],
        )
        outcome = outcome.decode()
        if outcome != "claimed":
            return outcome, None
        request_json = rec[0].decode()
        callback = json.loads(request_json).get("callback")
        return outcome, Claim(
            job_id=job_id, token=token, attempt=int(attempt), request_json=request_json,
            queued_at=float(rec[1] or now), priority=int(rec[2] or 0),
            callback_json=json.dumps(callback) if callback else None,
        )

    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False means the claim is lost (cancelled or taken over)."""
        until = time.time() + self.lease_s
        return bool(self._renew(keys=[keys.job(claim.job_id)], args=[claim.job_id, claim.token, repr(until)]))

    def holds(self, claim: Claim) -> bool:
        """Renew the lease, riding out a short Redis outage; False means the claim is lost."""
        reply, _ = self._through_outage(
            self._renew, keys=[keys.job(claim.job_id)],
            args=[claim.job_id, claim.token, repr(time.time() + self.lease_s)],
        )
        return bool(reply)

    def lost(self, claims: list[Claim]) -> list[str]:
        """The job ids among `claims` that this worker no longer holds (cancelled, taken over, gone).

        One pipelined round trip of reads, so a worker can ask often."""
        if not claims:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for claim in claims:
            pipe.hmget(keys.job(claim.job_id), "state", "claim")
        replies = pipe.execute()
        return [claim.job_id for claim, (state, token) in zip(claims, replies)
                if state != b"running" or token is None or token.decode() != claim.token]

    def succeed(self, claim: Claim, fields: dict[str, str]) -> bool:
        return self._end(claim, "succeeded", fields, "", "")

    def fail(self, claim: Claim, code: str, message: str, fields: dict[str, str] | None = None) -> bool:
        return self._end(claim, "failed", fields or {}, code, message)

    def _end(self, claim: Claim, state: str, fields: dict[str, str], code: str, message: str) -> bool:
        (done, now_state), retried = self._through_outage(
            self._finish, keys=[keys.job(claim.job_id), keys.events(claim.job_id)],
            args=[claim.job_id, claim.token, repr(time.time()), state, json.dumps(fields), code, message[:2000]],
        )
        if not done and retried and (now_state.decode() if isinstance(now_state, bytes) else now_state) == state:
            # The reply to an earlier try was lost: the transition may be ours already.
            owner = self.redis.hget(keys.job(claim.job_id), "worker_id")
            return owner is not None and owner.decode() == self.worker_id
        return bool(done)

    def requeue(self, claim: Claim, reason_code: str, *, count_attempt: bool) -> bool:
        """Give the job back to the queue (retry, or a drain that never started it)."""
        done, _ = self._through_outage(
            self._requeue, keys=[keys.job(claim.job_id), keys.events(claim.job_id)],
            args=[claim.job_id, claim.token, repr(time.time()), "1" if count_attempt else "0", reason_code],
        )
        return bool(done)

    def _through_outage(self, script, *, keys: list[str], args: list) -> tuple[object, bool]:
        """Run a claim holder's transition, riding out a Redis outage shorter than the lease.

        Without this, a blip at the moment a job ends leaves it `running` until its
        lease expires, and the sweeper then re-runs it and counts a worker crash.
        Returns (script reply, whether it was retried).
        """
        deadline = time.monotonic() + self.lease_s
        delay, retried = 0.2, False
        while True:
            try:
                return script(keys=keys, args=args), retried
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay, retried = min(2.0, delay * 2), True

    def sweep(self, *, resend_after_s: float, limit: int = 200) -> SweepResult:
        now = time.time()
        requeued, poisoned, resend = self._sweep(
            keys=[], args=[repr(now), self.max_crashes, repr(now - resend_after_s), limit]
        )
        dec = lambda xs: [x.decode() for x in xs]  # noqa: E731
        return SweepResult(dec(requeued), dec(poisoned), dec(resend))

    def state(self, job_id: str) -> str | None:
        v = self.redis.hget(keys.job(job_id), "state")
        return v.decode() if v else None

    def priority(self, job_id: str) -> int:
        v = self.redis.hget(keys.job(job_id), "priority")
        return int(v) if v else 0


__all__ = ["Claim", "JobStore", "SweepResult", "QUEUED_SET"]
