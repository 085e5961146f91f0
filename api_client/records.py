"""Job records in Redis: the producer's side of the state machine.

A job record is one Redis hash (keys.job). Every transition is one Lua
script, so it is atomic: it changes the hash, appends an event to the job's
event list and publishes it on the job's channel in one step. The worker's
transitions (claim, renew, finish, requeue, sweep) live in worker/jobs.py and
share LUA_COMMON with the ones here (create, cancel).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from api_client import keys
from api_client.schema import JobError, JobState, JobStatus

# Shared Lua: emit an event and end a job. KEYS[1]=job, KEYS[2]=events.
LUA_COMMON = """
local EVENTS_TTL = %(events_ttl)d
local PREFIX = '%(prefix)s'
local function emit(job_key, events_key, job_id, state, now, extra)
  local ev = {job_id = job_id, state = state, at = tonumber(now)}
  if extra then for k, v in pairs(extra) do ev[k] = v end end
  local s = cjson.encode(ev)
  redis.call('RPUSH', events_key, s)
  redis.call('EXPIRE', events_key, EVENTS_TTL)
  redis.call('PUBLISH', PREFIX .. ':chan:' .. job_id, s)
  -- A callback this event owes is recorded in the same step as the transition, so
  -- a lost notify message is repaired from here (worker/runtime.py sweep_once).
  if state ~= 'queued' then
    local ok, req = pcall(cjson.decode, redis.call('HGET', job_key, 'request') or '{}')
    local cb = ok and type(req) == 'table' and req['callback'] or nil
    if type(cb) == 'table' and type(cb['events']) == 'table' then
      for _, wanted in ipairs(cb['events']) do
        if wanted == state then
          redis.call('ZADD', PREFIX .. ':notify', now, job_id .. '|' .. state)
          redis.call('EXPIRE', PREFIX .. ':notify', EVENTS_TTL)
        end
      end
    end
  end
end
local function end_job(job_key, events_key, job_id, state, now, code, message)
  redis.call('HSET', job_key, 'state', state, 'finished_at', now)
  if code then redis.call('HSET', job_key, 'error_code', code, 'error_message', message) end
  redis.call('HDEL', job_key, 'claim', 'lease_until')
  redis.call('ZREM', PREFIX .. ':leases', job_id)
  redis.call('ZREM', PREFIX .. ':queued', job_id)
  emit(job_key, events_key, job_id, state, now, code and {error_code = code} or nil)
end
""" % {"events_ttl": keys.EVENTS_TTL_S, "prefix": keys.PREFIX}

QUEUED_SET = f"{keys.PREFIX}:queued"  # job_id -> time it was (re)queued

_CREATE = LUA_COMMON + """
-- KEYS: job, events, idem, queued ; ARGV: job_id, now, request, priority, deadline, ttl, use_idem, idem_ttl
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[8])
end
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'queued', 'request', ARGV[3],
           'priority', ARGV[4], 'deadline', ARGV[5], 'created_at', ARGV[2],
           'queued_at', ARGV[2], 'attempts', 0, 'crashes', 0)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[6])
emit(KEYS[1], KEYS[2], ARGV[1], 'queued', ARGV[2], nil)
return {1, ARGV[1]}
"""

_CANCEL = LUA_COMMON + """
-- KEYS: job, events ; ARGV: job_id, now
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if state ~= 'queued' and state ~= 'running' then return {0, state} end
end_job(KEYS[1], KEYS[2], ARGV[1], 'cancelled', ARGV[2], 'cancelled', 'cancelled by the producer')
return {1, state}
"""


class Records:
    """Create, cancel and read job records (what a producer may do)."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._create = client.register_script(_CREATE)
        self._cancel = client.register_script(_CANCEL)

    def create(
        self, job_id: str, request_json: str, *, now: float, priority: int,
        deadline: float | None, idempotency_key: str | None,
    ) -> tuple[bool, str]:
        """Returns (created, job_id); job_id is the earlier job's for a repeated idempotency key."""
        idem = keys.idempotency(idempotency_key) if idempotency_key else keys.idempotency("-")
        created, jid = self._create(
            keys=[keys.job(job_id), keys.events(job_id), idem, QUEUED_SET],
            args=[job_id, repr(now), request_json, priority, "" if deadline is None else repr(deadline),
                  keys.JOB_TTL_S, "1" if idempotency_key else "0", keys.IDEMPOTENCY_TTL_S],
        )
        return bool(created), jid.decode() if isinstance(jid, bytes) else jid

    def cancel(self, job_id: str, *, now: float) -> tuple[bool, str]:
        """Returns (cancelled_now, state_before)."""
        done, prev = self._cancel(keys=[keys.job(job_id), keys.events(job_id)], args=[job_id, repr(now)])
        return bool(done), prev.decode() if isinstance(prev, bytes) else prev

    def raw(self, job_id: str) -> dict[str, str]:
        data = self.redis.hgetall(keys.job(job_id))
        return {k.decode(): v.decode() for k, v in data.items()}

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.redis.lrange(keys.events(job_id), 0, -1)]


def status_from_record(rec: dict[str, str]) -> JobStatus:
    def num(name: str) -> float | None:
        v = rec.get(name)
        return float(v) if v not in (None, "") else None

    error = None
    if rec.get("error_code"):
        error = JobError(code=rec["error_code"], message=rec.get("error_message", ""))
    return JobStatus(
        job_id=rec["job_id"],
        state=JobState(rec["state"]),
        attempts=int(rec.get("attempts", 0)),
        created_at=num("created_at"),
        queued_at=num("queued_at"),
        started_at=num("started_at"),
        finished_at=num("finished_at"),
        worker_id=rec.get("worker_id") or None,
        error=error,
        output_preview=rec.get("output_preview") or None,
        batch_size=int(rec["batch_size"]) if rec.get("batch_size") else None,
        result_url=rec.get("result_url") or None,
    )
