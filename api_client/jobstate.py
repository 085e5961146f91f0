"""The job state machine: every transition of a job record, as one named Lua script each
(api_client/lua/<transition>.lua, after the helpers in lua/common.lua).

    create ─► queued ─claim─► running ─succeed─► succeeded
                │  ▲            │ │ └──fail───► failed
                │  └─requeue────┘ └──cancel───► cancelled
                ├─cancel─► cancelled            (renew extends a running job's lease)
                └─expire─► failed: expired      (deadline passed before it started)
    sweep: a running job whose lease ran out goes back to queued (a crash), or
           after max_crashes ends failed: poison; a queued job whose message may be
           lost is flagged to be sent again.
    withdraw: a submit refused after its record was written (no replica confirmed it)
           deletes the record, if no worker started it.

Every script is safe to run twice with the same arguments (redis-py retries a command
whose reply was lost, and a retried EVALSHA runs again): a second run changes nothing
(tests/integration/test_scripts_twice.py). A NOSCRIPT (a restarted or failed-over
Redis has no scripts) is answered by redis-py's Script, which loads the script again.

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
from importlib import resources
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from api_client import keys
from api_client.redis_conn import LOCAL, Durability

TRANSITIONS = ("create", "claim", "renew", "succeed", "fail", "requeue", "cancel", "expire", "sweep", "withdraw")
SCRIPT_NAMES = (*TRANSITIONS, "progress")  # progress: not a transition, a running job's latest snapshot


class NotReplicated(redis.ConnectionError):
    """No replica confirmed a submit's record in time (Durability `replica`): the submit is refused
    as unavailable, like a Redis that cannot be reached, and its record withdrawn."""


def _load_scripts() -> dict[str, str]:
    """Each transition's Lua source, api_client/lua/<name>.lua, after the shared helpers."""
    lua = resources.files("api_client") / "lua"
    common = f"local EVENTS_TTL, JOB_TTL = {keys.EVENTS_TTL_S}, {keys.JOB_TTL_S}\n" + (lua / "common.lua").read_text()
    return {name: common + (lua / f"{name}.lua").read_text() for name in SCRIPT_NAMES}


SCRIPTS = _load_scripts()


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int
    request_json: str
    queued_at: float
    priority: int
    tenant: str = keys.INTERNAL_TENANT


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


def as_text(v: Any) -> str:
    """A Redis reply value as text ('' for none): replies are bytes unless the client decodes them."""
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


class JobStore:
    """Every transition of a job record, and the reads of it. Thread-safe (one redis client).

    `worker_id`, `lease_s` and `max_crashes` matter only to a worker's transitions.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster, *, worker_id: str = "", lease_s: float = 60,
                 max_crashes: int = 3, durability: Durability = LOCAL):
        self.redis = client
        self.durability = durability
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_crashes = max_crashes
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        self.clustered = isinstance(client, redis.RedisCluster)  # the waiting set: one share per shard there

    def run(self, name: str, job_id: str, *args: Any, extra_keys: tuple[str, ...] = (), pipe: Any = None) -> Any:
        """Run one named transition on one job; its KEYS are the job's (see keys.JobKeys), then the
        waiting set (keys.waiting_key), then `extra_keys`.
        With `pipe`, it is queued on that pipeline and its reply comes from `pipe.execute()`."""
        given = [*keys.JobKeys.of(job_id).as_list(), keys.waiting_key(job_id, self.clustered), *extra_keys]
        return self.scripts[name](keys=given, args=[job_id, *args], client=pipe)

    def waiting(self) -> int:
        """Jobs that wait (queued, wherever they wait): the scaling signal KEDA reads."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.waiting_keys(self.clustered):
            pipe.zcard(key)
        return sum(pipe.execute())

    # ---- the producer's transitions ----------------------------------------
    def new_job_id(self, idempotency_key: str | None, tenant: str = keys.INTERNAL_TENANT) -> str:
        """A fresh id; with an idempotency key, one in that key's shard, so both share a slot."""
        scoped = None if idempotency_key is None else f"{tenant}/{idempotency_key}"
        while True:
            job_id = uuid.uuid4().hex
            if scoped is None or keys.shard_of(job_id) == keys.idempotency_shard(scoped):
                return job_id

    def create(self, job_id: str, request_json: str, *, now: float, priority: int, deadline: float | None,
               idempotency_key: str | None, tenant: str = keys.INTERNAL_TENANT, batch_id: str = "") -> Transition:
        """`job_id` is the job that holds the request: this one, or the earlier one of a repeated key.

        Idempotency keys are per tenant: another tenant's same key is another job."""
        if not self.durability.waits:
            created, jid = self._create(job_id, request_json, now, priority, deadline, idempotency_key, tenant,
                                        batch_id)
            return Transition(job_id=as_text(jid), done=bool(created), state="queued")
        pipe = self.redis.pipeline(transaction=False)
        self._create(job_id, request_json, now, priority, deadline, idempotency_key, tenant, batch_id, pipe=pipe)
        try:
            [(created, jid)] = self._execute_durably(pipe, "the job's record")
        except NotReplicated:
            # A repeated idempotency key created nothing under job_id: withdraw then finds no record.
            self.withdraw(job_id, idempotency_key, tenant)
            raise
        return Transition(job_id=as_text(jid), done=bool(created), state="queued")

    def write_durably(self, *writes: tuple[str, tuple[Any, ...]]) -> None:
        """Run `writes` ((client method, args)) in one round trip on one connection; with durability
        `replica`, then WAIT: NotReplicated if too few replicas have them (and so all written before)."""
        pipe = self.redis.pipeline(transaction=False)
        for method, args in writes:
            getattr(pipe, method)(*args)
        self._execute_durably(pipe, "the writes")

    def _execute_durably(self, pipe: Any, what: str) -> list[Any]:
        """Execute `pipe` (one connection: WAIT counts that connection's writes) and return its replies;
        with durability `replica`, WAIT after them: NotReplicated if too few replicas confirm `what`."""
        if not self.durability.waits:
            return pipe.execute()
        pipe.wait(self.durability.replicas, self.durability.timeout_ms)
        try:
            *replies, acked = pipe.execute()
        except redis.ResponseError as exc:
            self._demoted(exc)
            raise NotReplicated(f"the primary was demoted under {what} (a failover)") from exc
        if int(acked) < self.durability.replicas:
            raise NotReplicated(f"{acked} of {self.durability.replicas} replicas confirmed {what} "
                                f"within {self.durability.timeout_ms} ms")
        return replies

    def _demoted(self, exc: redis.ResponseError) -> None:
        """WAIT on a node that became a replica (a failover between connect and WAIT): drop the pool's
        connections, so the next command asks for the primary again; anything else is raised."""
        if "WAIT cannot be used with replica" not in str(exc):
            raise exc
        pool = getattr(self.redis, "connection_pool", None)  # a RedisCluster has one per node
        if pool is not None:
            pool.disconnect()

    def withdraw(self, job_id: str, idempotency_key: str | None = None, tenant: str = keys.INTERNAL_TENANT) -> bool:
        """Delete a refused submit's record if nobody started it; False if it could not (then it may run)."""
        scoped = f"{tenant}/{idempotency_key}" if idempotency_key else "-"
        try:
            return bool(self.run("withdraw", job_id, extra_keys=(keys.idempotency(scoped, keys.shard_of(job_id)),)))
        except redis.RedisError:
            return False

    def create_many(self, jobs: list[tuple[str, str]], *, now: float, priority: int, tenant: str,
                    batch_id: str) -> list[Transition]:
        """(job_id, request JSON) each, created in one pipelined round trip (a batch file's chunk)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, request_json in jobs:
            self._create(job_id, request_json, now, priority, None, None, tenant, batch_id, pipe=pipe)
        return [Transition(job_id=as_text(jid), done=bool(created), state="queued")
                for created, jid in pipe.execute()]

    def _create(self, job_id: str, request_json: str, now: float, priority: int, deadline: float | None,
                idempotency_key: str | None, tenant: str, batch_id: str, pipe: Any = None) -> Any:
        scoped = f"{tenant}/{idempotency_key}" if idempotency_key else "-"
        idem = keys.idempotency(scoped, keys.shard_of(job_id))
        return self.run(
            "create", job_id, repr(now), request_json, priority, "" if deadline is None else repr(deadline),
            keys.JOB_TTL_S, "1" if idempotency_key else "0", keys.IDEMPOTENCY_TTL_S, tenant, batch_id,
            extra_keys=(idem,), pipe=pipe)

    def cancel(self, job_id: str, *, now: float | None = None) -> Transition:
        done, state, owed = self.run("cancel", job_id, repr(now or time.time()))
        return Transition(job_id, bool(done), as_text(state), as_text(owed) or None)

    # ---- the worker's transitions ------------------------------------------
    def claim(self, job_id: str) -> Transition:
        now, token = time.time(), uuid.uuid4().hex
        # The record comes back with the claim: a second round trip could fail after the
        # claim succeeded and strand the job as `running` until its lease expires.
        outcome, attempt, owed, *rec = self.run("claim", job_id, self.worker_id, token, repr(now),
                                                repr(now + self.lease_s), self.max_crashes)
        outcome = as_text(outcome)
        if outcome != "claimed":
            state = "failed" if outcome in ("expired", "poison") else ""
            return Transition(job_id, False, state, as_text(owed) or None, outcome=outcome)
        claim = Claim(job_id=job_id, token=token, attempt=int(attempt), request_json=as_text(rec[0]),
                      queued_at=float(as_text(rec[1]) or now), priority=int(as_text(rec[2]) or 0),
                      tenant=as_text(rec[3]) or keys.INTERNAL_TENANT)
        return Transition(job_id, True, "running", as_text(owed) or None, claim=claim, outcome=outcome)

    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False means the claim is lost (cancelled or taken over)."""
        return bool(self.run("renew", claim.job_id, claim.token, repr(time.time() + self.lease_s)))

    def holds(self, claim: Claim) -> bool:
        """Is the claim still this worker's? One read (the lease renewer keeps the lease), riding out
        a short Redis outage; False means it is lost (cancelled or taken over)."""
        reply, _ = self._through_outage(lambda: self.lost([claim]))
        return not reply

    def progress(self, claim: Claim, completion_tokens: int, text: str) -> bool:
        """Record a running job's output so far (claim holder only) and announce it on its channel."""
        return bool(self.run("progress", claim.job_id, claim.token, completion_tokens, text, repr(time.time())))

    def lost(self, claims: list[Claim]) -> list[str]:
        """The ids among `claims` this worker no longer holds (cancelled, taken over): one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for claim in claims:
            pipe.hmget(keys.job(claim.job_id), "state", "claim")
        replies = pipe.execute() if claims else []
        return [claim.job_id for claim, (state, token) in zip(claims, replies, strict=True)
                if as_text(state) != "running" or as_text(token) != claim.token]

    def succeed(self, claim: Claim, fields: dict[str, str]) -> Transition:
        return self._end(claim, "succeeded", repr(time.time()), json.dumps(fields))

    def fail(self, claim: Claim, code: str, message: str) -> Transition:
        return self._end(claim, "failed", repr(time.time()), code, message[:2000])

    def _end(self, claim: Claim, state: str, *args: str) -> Transition:
        script = "succeed" if state == "succeeded" else "fail"
        (done, now_state, owed), retried = self._through_outage(
            lambda: self.run(script, claim.job_id, claim.token, *args))
        if not done and retried and as_text(now_state) == state:
            # The reply to an earlier try was lost: the transition may be ours already.
            if as_text(self.redis.hget(keys.job(claim.job_id), "worker_id")) == self.worker_id:
                owes = self.redis.zscore(keys.JobKeys.of(claim.job_id).shard.notify, f"{claim.job_id}|{state}")
                return Transition(claim.job_id, True, state, state if owes is not None else None)
        return Transition(claim.job_id, bool(done), as_text(now_state), as_text(owed) or None)

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
    def sweep(self, *, resend_after_s: float, limit: int = 200,
              present: Callable[[set[str]], set[str]] | None = None) -> list[Transition]:
        """Requeue or poison jobs whose lease ran out, expire late queued jobs, and flag queued
        jobs whose message may be lost (outcome "resend"): queued for `resend_after_s` or more,
        and, with `present` (api_client/broker_scan.py), not among the ids it finds in the broker;
        those it finds are marked seen now, so each is looked for again `resend_after_s` later.
        Returns what changed."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for shard in keys.all_shards():
            pipe.zrangebyscore(shard.leases, "-inf", now, start=0, num=limit)
            pipe.zrangebyscore(shard.queued, "-inf", now - resend_after_s, start=0, num=limit)
            pipe.zrangebyscore(shard.deadlines, "-inf", now, start=0, num=limit)
        replies = pipe.execute()  # per shard: late leases, stale queued, passed deadlines
        late = {as_text(j) for i, ids in enumerate(replies) if i % 3 == 0 for j in ids}
        stale = {as_text(j) for i, ids in enumerate(replies) if i % 3 == 1 for j in ids} - late
        if present is not None and stale:
            waiting = present(stale)
            if waiting:
                seen = self.redis.pipeline(transaction=False)
                for job_id in waiting:  # XX: not if it left the index meanwhile
                    seen.zadd(keys.JobKeys.of(job_id).shard.queued, {job_id: now}, xx=True)
                seen.execute()
            stale -= waiting
        late |= stale
        expired, changed = {as_text(j) for i, ids in enumerate(replies) if i % 3 == 2 for j in ids}, []
        for job_id in sorted(expired):
            done, state, owed = self.run("expire", job_id, repr(now))
            if done:
                changed.append(Transition(job_id, True, as_text(state), as_text(owed) or None, outcome="expired"))
        for job_id in sorted(late - {t.job_id for t in changed}):
            outcome, owed, priority = self.run("sweep", job_id, repr(now), self.max_crashes,
                                               repr(now - resend_after_s))
            outcome = as_text(outcome)
            if outcome in ("requeued", "poisoned", "resend"):
                state = "failed" if outcome == "poisoned" else "queued"
                changed.append(Transition(job_id, outcome != "resend", state, as_text(owed) or None,
                                          outcome=outcome, priority=int(as_text(priority) or 0)))
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
            for member in map(as_text, members):
                self.redis.zadd(shard.notify, {member: now}, xx=True)
                job_id, _, event = member.rpartition("|")
                owed.append((job_id, event))
        return owed

    def callback_settled(self, job_id: str, event: str) -> None:
        """The notify for this event ran (delivered, dead-lettered or retrying on its own)."""
        self.redis.zrem(keys.JobKeys.of(job_id).shard.notify, f"{job_id}|{event}")

    # ---- reads -------------------------------------------------------------
    def raw(self, job_id: str) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.redis.hgetall(keys.job(job_id)).items()}

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job(job_id)))

    def tenant_of(self, job_id: str) -> str | None:
        return as_text(self.redis.hget(keys.job(job_id), "tenant")) or None

    def state(self, job_id: str) -> str | None:
        return as_text(self.redis.hget(keys.job(job_id), "state")) or None

    def result_json(self, job_id: str) -> str | None:
        return as_text(self.redis.hget(keys.job(job_id), "result")) or None

    def events(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.redis.lrange(keys.events(job_id), start, -1)]
