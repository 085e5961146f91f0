"""The job state machine: every transition of a job record, as one named Lua script each.

    create ─► queued ─claim─► running ─succeed─► succeeded
                │  ▲            │ │ └──fail───► failed
                │  └─requeue────┘ └──cancel───► cancelled
                ├─cancel─► cancelled            (renew extends a running job's lease)
                └─expire─► failed: expired      (deadline passed before it started)
    sweep: a running job whose lease ran out goes back to queued (a crash), or
           after max_crashes ends failed: poison; a queued job whose message may be
           lost is flagged to be sent again.

Each script is atomic: it changes the record, appends the event to the job's
list, publishes it, and, when the request's callback asked for that event,
records the owed callback (`notify` index). That is the one place the "does this
callback want this event" decision is made; `Transition.notify` carries it out.
Exactly one result per job despite at-least-once delivery: `claim` hands out a
fresh token with a lease, and only the token holder can renew, succeed, fail or
requeue. Every key a script touches comes in `KEYS[]` from `keys.JobKeys`, all
under the job's hash tag. `JobStore` owns the scripts; the client uses create,
cancel and the reads, the worker the rest.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from api_client import keys

# KEYS, for every job script: 1 record, 2 events, 3 channel, 4 leases, 5 queued,
# 6 deadlines, 7 notify (create adds 8 idempotency). ARGV[1] is always the job id.
_COMMON = f"local EVENTS_TTL, JOB_TTL = {keys.EVENTS_TTL_S}, {keys.JOB_TTL_S}\n" + """
local function emit(state, now, extra)
  local ev = {job_id = ARGV[1], state = state, at = tonumber(now)}
  if extra then for k, v in pairs(extra) do ev[k] = v end end
  local s = cjson.encode(ev)
  redis.call('RPUSH', KEYS[2], s)
  redis.call('EXPIRE', KEYS[2], EVENTS_TTL)
  redis.call('PUBLISH', KEYS[3], s)
  if state == 'queued' then return '' end
  local ok, req = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'request') or '{}')
  local cb = ok and type(req) == 'table' and req['callback'] or nil
  if type(cb) ~= 'table' or type(cb['events']) ~= 'table' then return '' end
  for _, wanted in ipairs(cb['events']) do
    if wanted == state then
      redis.call('ZADD', KEYS[7], now, ARGV[1] .. '|' .. state)
      redis.call('EXPIRE', KEYS[7], EVENTS_TTL)
      return state
    end
  end
  return ''
end
local function unindex() for n = 4, 6 do redis.call('ZREM', KEYS[n], ARGV[1]) end end
local function index(n, score)  -- add this job to the index KEYS[n]
  redis.call('ZADD', KEYS[n], score, ARGV[1])
  redis.call('EXPIRE', KEYS[n], JOB_TTL)
end
local function end_job(state, now, code, message)
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', now)
  if code then redis.call('HSET', KEYS[1], 'error_code', code, 'error_message', message) end
  redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
  unindex()
  return emit(state, now, code and {error_code = code} or nil)
end
local function to_queue(now, reason)
  redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at', now, 'last_error_code', reason)
  redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
  redis.call('ZREM', KEYS[4], ARGV[1])
  index(5, now)
  local deadline = redis.call('HGET', KEYS[1], 'deadline')
  if deadline and deadline ~= '' then index(6, deadline) end
  emit('queued', now, {retry_of = reason})
end
local function crashed(now, max_crashes)
  local crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1)
  if crashes < tonumber(max_crashes) then return nil end
  return end_job('failed', now, 'poison', 'its worker died ' .. crashes .. ' times while running it')
end
local function holder(token)
  local st = redis.call('HMGET', KEYS[1], 'state', 'claim')
  return st[1] == 'running' and st[2] == token, st[1] or ''
end
"""

SCRIPTS: dict[str, str] = {
    # ARGV: job_id, now, request, priority, deadline, ttl, use_idempotency, idempotency_ttl
    "create": """
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[8])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[8], ARGV[1], 'EX', ARGV[8])
end
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'queued', 'request', ARGV[3], 'priority', ARGV[4],
           'deadline', ARGV[5], 'created_at', ARGV[2], 'queued_at', ARGV[2], 'attempts', 0, 'crashes', 0)
redis.call('EXPIRE', KEYS[1], ARGV[6])
index(5, ARGV[2])
if ARGV[5] ~= '' then index(6, ARGV[5]) end
emit('queued', ARGV[2], nil)
return {1, ARGV[1]}
""",
    # ARGV: job_id, worker_id, token, now, lease_until, max_crashes
    "claim": """
local st = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'deadline')
if not st[1] then return {'missing', 0, ''} end
if st[1] ~= 'queued' and st[1] ~= 'running' then return {'terminal', 0, ''} end
local now = tonumber(ARGV[4])
if st[1] == 'running' then
  if tonumber(st[2] or '0') > now then return {'busy', 0, ''} end
  local poisoned = crashed(ARGV[4], ARGV[6])  -- the holder's lease ran out before a sweep saw it
  if poisoned then return {'poison', 0, poisoned} end
end
if st[3] and st[3] ~= '' and tonumber(st[3]) < now then
  return {'expired', 0, end_job('failed', ARGV[4], 'expired', 'deadline passed before the job started')}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker_id', ARGV[2], 'claim', ARGV[3],
           'started_at', ARGV[4], 'lease_until', ARGV[5])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
index(4, ARGV[5])
local owed = emit('running', ARGV[4], {attempt = attempts, worker_id = ARGV[2]})
local rec = redis.call('HMGET', KEYS[1], 'request', 'queued_at', 'priority')
return {'claimed', attempts, owed, rec[1], rec[2] or '', rec[3] or ''}
""",
    # ARGV: job_id, token, lease_until
    "renew": """
if not holder(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3])
index(4, ARGV[3])
return 1
""",
    # ARGV: job_id, token, now, fields_json
    "succeed": """
local held, state = holder(ARGV[2])
if not held then return {0, state, ''} end
for k, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[1], k, v) end
return {1, 'succeeded', end_job('succeeded', ARGV[3], nil, nil)}
""",
    # ARGV: job_id, token, now, error_code, error_message
    "fail": """
local held, state = holder(ARGV[2])
if not held then return {0, state, ''} end
return {1, 'failed', end_job('failed', ARGV[3], ARGV[4], ARGV[5])}
""",
    # ARGV: job_id, token, now, count_attempt, reason_code
    "requeue": """
local held, state = holder(ARGV[2])
if not held then return {0, state, ''} end
if ARGV[4] == '0' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
to_queue(ARGV[3], ARGV[5])
return {1, 'queued', ''}
""",
    # ARGV: job_id, now
    "cancel": """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {0, state or '', ''} end
return {1, 'cancelled', end_job('cancelled', ARGV[2], 'cancelled', 'cancelled by the producer')}
""",
    # ARGV: job_id, now
    "expire": """
local st = redis.call('HMGET', KEYS[1], 'state', 'deadline')
if st[1] == 'queued' and st[2] and st[2] ~= '' and tonumber(st[2]) < tonumber(ARGV[2]) then
  return {1, 'failed', end_job('failed', ARGV[2], 'expired', 'deadline passed before the job started')}
end
if st[1] ~= 'queued' then redis.call('ZREM', KEYS[6], ARGV[1]) end
return {0, st[1] or '', ''}
""",
    # ARGV: job_id, now, max_crashes, resend_before
    "sweep": """
local st = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'priority')
local priority = st[3] or '0'
if st[1] == 'running' then
  if tonumber(st[2] or '0') > tonumber(ARGV[2]) then return {'live', '', priority} end
  local poisoned = crashed(ARGV[2], ARGV[3])
  if poisoned then return {'poisoned', poisoned, priority} end
  to_queue(ARGV[2], 'lease_expired')
  return {'requeued', '', priority}
end
redis.call('ZREM', KEYS[4], ARGV[1])
if st[1] ~= 'queued' then
  unindex()
  return {'gone', '', priority}
end
local since = redis.call('ZSCORE', KEYS[5], ARGV[1])
if since and tonumber(since) <= tonumber(ARGV[4]) then
  index(5, ARGV[2])  -- its message may be lost: send another (a duplicate is dropped at claim)
  return {'resend', '', priority}
end
return {'queued', '', priority}
""",
}


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    request_json: str
    queued_at: float
    priority: int


@dataclass(frozen=True)
class Transition:
    """What a transition did. `notify` names the event whose callback is now owed (send one notify)."""

    job_id: str
    done: bool
    state: str  # the state after the script ran ('' when there is no record)
    notify: str | None = None
    claim: Claim | None = None  # claim only
    outcome: str = ""  # claim: claimed|busy|terminal|missing|expired|poison; sweep: requeued|poisoned|resend|...
    priority: int = 0  # sweep only: for the message sent again


T = TypeVar("T")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


class JobStore:
    """Every transition of a job record, and the reads of it. Thread-safe (one redis client).

    `worker_id`, `lease_s` and `max_crashes` matter only to a worker's transitions.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster, *, worker_id: str = "", lease_s: float = 60,
                 max_crashes: int = 3):
        self.redis = client
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_crashes = max_crashes
        self.scripts = {name: client.register_script(_COMMON + body) for name, body in SCRIPTS.items()}

    def run(self, name: str, job_id: str, *args: Any, extra_keys: tuple[str, ...] = ()) -> list[Any]:
        """Run one named transition on one job; its KEYS are the job's (see keys.JobKeys)."""
        return self.scripts[name](keys=keys.JobKeys.of(job_id).as_list() + list(extra_keys), args=[job_id, *args])

    # ---- the producer's transitions ----------------------------------------
    def new_job_id(self, idempotency_key: str | None) -> str:
        """A fresh id; with an idempotency key, one in that key's shard, so both share a slot."""
        while True:
            job_id = uuid.uuid4().hex
            if idempotency_key is None or keys.shard_of(job_id) == keys.idempotency_shard(idempotency_key):
                return job_id

    def create(self, job_id: str, request_json: str, *, now: float, priority: int, deadline: float | None,
               idempotency_key: str | None) -> Transition:
        """`job_id` is the job that holds the request: this one, or the earlier one of a repeated key."""
        idem = keys.idempotency(idempotency_key or "-", keys.shard_of(job_id))
        created, jid = self.run(
            "create", job_id, repr(now), request_json, priority, "" if deadline is None else repr(deadline),
            keys.JOB_TTL_S, "1" if idempotency_key else "0", keys.IDEMPOTENCY_TTL_S, extra_keys=(idem,))
        return Transition(job_id=_text(jid), done=bool(created), state="queued")

    def cancel(self, job_id: str, *, now: float | None = None) -> Transition:
        done, state, owed = self.run("cancel", job_id, repr(now or time.time()))
        return Transition(job_id, bool(done), _text(state), _text(owed) or None)

    # ---- the worker's transitions ------------------------------------------
    def claim(self, job_id: str) -> Transition:
        now, token = time.time(), uuid.uuid4().hex
        # The record comes back with the claim: a second round trip could fail after the
        # claim succeeded and strand the job as `running` until its lease expires.
        outcome, attempt, owed, *rec = self.run("claim", job_id, self.worker_id, token, repr(now),
                                                repr(now + self.lease_s), self.max_crashes)
        outcome = _text(outcome)
        if outcome != "claimed":
            state = "failed" if outcome in ("expired", "poison") else ""
            return Transition(job_id, False, state, _text(owed) or None, outcome=outcome)
        claim = Claim(job_id=job_id, token=token, attempt=int(attempt), request_json=_text(rec[0]),
                      queued_at=float(_text(rec[1]) or now), priority=int(_text(rec[2]) or 0))
        return Transition(job_id, True, "running", _text(owed) or None, claim=claim, outcome=outcome)

    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False means the claim is lost (cancelled or taken over)."""
        return bool(self.run("renew", claim.job_id, claim.token, repr(time.time() + self.lease_s)))

    def holds(self, claim: Claim) -> bool:
        """Renew the lease, riding out a short Redis outage; False means the claim is lost."""
        reply, _ = self._through_outage(lambda: self.renew(claim))
        return bool(reply)

    def lost(self, claims: list[Claim]) -> list[str]:
        """The ids among `claims` this worker no longer holds (cancelled, taken over): one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for claim in claims:
            pipe.hmget(keys.job(claim.job_id), "state", "claim")
        replies = pipe.execute() if claims else []
        return [claim.job_id for claim, (state, token) in zip(claims, replies, strict=True)
                if _text(state) != "running" or _text(token) != claim.token]

    def succeed(self, claim: Claim, fields: dict[str, str]) -> Transition:
        return self._end(claim, "succeeded", repr(time.time()), json.dumps(fields))

    def fail(self, claim: Claim, code: str, message: str) -> Transition:
        return self._end(claim, "failed", repr(time.time()), code, message[:2000])

    def _end(self, claim: Claim, state: str, *args: str) -> Transition:
        script = "succeed" if state == "succeeded" else "fail"
        (done, now_state, owed), retried = self._through_outage(
            lambda: self.run(script, claim.job_id, claim.token, *args))
        if not done and retried and _text(now_state) == state:
            # The reply to an earlier try was lost: the transition may be ours already.
            if _text(self.redis.hget(keys.job(claim.job_id), "worker_id")) == self.worker_id:
                owes = self.redis.zscore(keys.JobKeys.of(claim.job_id).shard.notify, f"{claim.job_id}|{state}")
                return Transition(claim.job_id, True, state, state if owes is not None else None)
        return Transition(claim.job_id, bool(done), _text(now_state), _text(owed) or None)

    def requeue(self, claim: Claim, reason_code: str, *, count_attempt: bool) -> bool:
        """Give the job back to the queue (retry, or a drain that never started it)."""
        (done, _, _), _ = self._through_outage(lambda: self.run(
            "requeue", claim.job_id, claim.token, repr(time.time()), "1" if count_attempt else "0", reason_code))
        return bool(done)

    def _through_outage(self, call: Callable[[], T]) -> tuple[T, bool]:
        """(reply, retried): a claim holder's transition, riding out a Redis outage shorter than the
        lease; without it, a blip as a job ends leaves it `running`, then re-run as a crash."""
        deadline = time.monotonic() + self.lease_s
        delay, retried = 0.2, False
        while True:
            try:
                return call(), retried
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay, retried = min(2.0, delay * 2), True

    # ---- the sweeper -------------------------------------------------------
    def sweep(self, *, resend_after_s: float, limit: int = 200) -> list[Transition]:
        """Requeue or poison jobs whose lease ran out, expire late queued jobs, and flag queued
        jobs whose message may be lost (outcome "resend"). Returns what changed."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for shard in keys.all_shards():
            pipe.zrangebyscore(shard.leases, "-inf", now, start=0, num=limit)
            pipe.zrangebyscore(shard.queued, "-inf", now - resend_after_s, start=0, num=limit)
            pipe.zrangebyscore(shard.deadlines, "-inf", now, start=0, num=limit)
        replies = pipe.execute()  # per shard: late leases, stale queued, passed deadlines
        late = {_text(j) for i, ids in enumerate(replies) if i % 3 != 2 for j in ids}
        expired, changed = {_text(j) for i, ids in enumerate(replies) if i % 3 == 2 for j in ids}, []
        for job_id in sorted(expired):
            done, state, owed = self.run("expire", job_id, repr(now))
            if done:
                changed.append(Transition(job_id, True, _text(state), _text(owed) or None, outcome="expired"))
        for job_id in sorted(late - {t.job_id for t in changed}):
            outcome, owed, priority = self.run("sweep", job_id, repr(now), self.max_crashes,
                                               repr(now - resend_after_s))
            outcome = _text(outcome)
            if outcome in ("requeued", "poisoned", "resend"):
                state = "failed" if outcome == "poisoned" else "queued"
                changed.append(Transition(job_id, outcome != "resend", state, _text(owed) or None,
                                          outcome=outcome, priority=int(_text(priority) or 0)))
        return changed

    def owed_callbacks(self, *, older_than_s: float, limit: int = 200) -> list[tuple[str, str]]:
        """(job_id, event) of every callback still owed after `older_than_s`; each is pushed back
        by another interval, so it comes up again only if its notify is lost again."""
        now = time.time()
        shards = keys.all_shards()
        pipe = self.redis.pipeline(transaction=False)
        for shard in shards:
            pipe.zrangebyscore(shard.notify, "-inf", now - older_than_s, start=0, num=limit)
        owed: list[tuple[str, str]] = []
        for shard, members in zip(shards, pipe.execute(), strict=True):
            for member in map(_text, members):
                self.redis.zadd(shard.notify, {member: now}, xx=True)
                job_id, _, event = member.rpartition("|")
                owed.append((job_id, event))
        return owed

    def callback_settled(self, job_id: str, event: str) -> None:
        """The notify for this event ran (delivered, dead-lettered or retrying on its own)."""
        self.redis.zrem(keys.JobKeys.of(job_id).shard.notify, f"{job_id}|{event}")

    # ---- reads -------------------------------------------------------------
    def raw(self, job_id: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.redis.hgetall(keys.job(job_id)).items()}

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job(job_id)))

    def state(self, job_id: str) -> str | None:
        return _text(self.redis.hget(keys.job(job_id), "state")) or None

    def result_json(self, job_id: str) -> str | None:
        return _text(self.redis.hget(keys.job(job_id), "result")) or None

    def events(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.redis.lrange(keys.events(job_id), start, -1)]
