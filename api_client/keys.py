"""Every Redis key, queue and task name the service uses, and their TTLs.

Nothing else builds a key name: the Lua scripts of api_client/jobstate.py
receive theirs in `KEYS[]`, from `JobKeys` below.

Redis Cluster: a job's keys carry the hash tag of its shard, `{ivq:<n>}`, and
so do the indexes its transitions update (leases, queued, deadlines, owed
callbacks). Every script therefore touches one slot, which is what Redis
Cluster and Redis proxies require, and the SHARDS tags spread the job state
over up to SHARDS slots (and so nodes). A job's shard is fixed by its id.
Changing SHARDS moves every key: do it on an empty Redis only. One exception:
the scaling signal `WAITING` is one key for the whole service (what KEDA reads);
on a Redis Cluster each shard keeps its own share instead (`waiting_key`).

The Celery broker lists (`infer`, `infer:3`, ...) are kombu's, not ours: kombu's
Redis transport does not run on Redis Cluster, so the broker stays a plain Redis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

PREFIX = "ivq"
SHARDS = 16

# Celery queues and task names (the client sends tasks by name; it never
# imports the worker). api_client/dispatch.py sends every message.
INFER_QUEUE = "infer"
CALLBACKS_QUEUE = "callbacks"
INFER_TASK = "ivq.infer"  # (job_id): run the job
NOTIFY_TASK = "ivq.notify"  # (job_id, event): build the callback one event owes, then deliver it
CALLBACK_TASK = "ivq.deliver_callback"  # (delivery): one more delivery attempt

# Redis broker priorities: kombu keeps one list per step, named
# "infer", "infer:3", "infer:6", "infer:9" (KEDA counts `WAITING`, which holds every queued job).
PRIORITY_STEPS = [0, 3, 6, 9]
PRIORITY_SEP = ":"


def broker_transport_options(visibility_timeout_s: int = 3600) -> dict:
    return {
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
        "visibility_timeout": visibility_timeout_s,
    }


def infer_queue_lists() -> list[str]:
    """The Redis lists that hold pending inference messages (kombu's; KEDA reads `WAITING` instead)."""
    return [INFER_QUEUE] + [f"{INFER_QUEUE}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS[1:]]


BATCH_PRIORITY = -1  # a job of a batch file: below every interactive priority


def celery_priority(request_priority: int) -> int:
    """Our priority is 0 (normal) .. 9 (most urgent), and BATCH_PRIORITY for batch jobs;
    kombu's redis runs lower numbers first and files a message under the largest step at
    or below its number. Interactive jobs use steps 0 (priority 7-9), 3 (4-6) and 6 (0-3);
    batch jobs step 9 alone, so they run only when no interactive job waits."""
    return 9 if request_priority < 0 else min(6, 9 - request_priority)


# TTLs (seconds)
JOB_TTL_S = 7 * 24 * 3600  # job record, including the short result copy
IDEMPOTENCY_TTL_S = 24 * 3600
EVENTS_TTL_S = 24 * 3600
DEAD_LETTER_TTL_S = 14 * 24 * 3600


def shard_of(job_id: str) -> int:
    return zlib.crc32(job_id.encode()) % SHARDS


def _tag(shard: int) -> str:
    return f"{{{PREFIX}:{shard}}}"


@dataclass(frozen=True)
class ShardKeys:
    """The indexes of one shard; the sweeper walks them, the transitions update them."""

    leases: str  # sorted set: running job_id -> lease expiry (unix s); the sweeper requeues the late
    queued: str  # sorted set: queued job_id -> when (re)queued; the sweeper re-sends a lost message
    deadlines: str  # sorted set: queued job_id -> its deadline; the sweeper expires the late
    notify: str  # sorted set: "job_id|event" -> time, for each callback owed whose notify has not run
    counts: str  # hash: this shard's share of the per-tenant and per-batch counters (`tenant_field`, `batch_field`)

    @classmethod
    def of(cls, shard: int) -> ShardKeys:
        t = _tag(shard)
        return cls(leases=f"{t}:leases", queued=f"{t}:queued", deadlines=f"{t}:deadlines", notify=f"{t}:notify",
                   counts=f"{t}:counts")


@dataclass(frozen=True)
class JobKeys:
    """Every key one job's transitions touch, in the order the Lua scripts read `KEYS[]`."""

    record: str  # hash: state, request JSON, timestamps, claim, result copy
    events: str  # list of JSON events, one per transition
    channel: str  # pub/sub channel announcing each event (not a key, but it shares the tag)
    shard: ShardKeys

    @classmethod
    def of(cls, job_id: str) -> JobKeys:
        t = _tag(shard_of(job_id))
        return cls(record=f"{t}:job:{job_id}", events=f"{t}:events:{job_id}", channel=f"{t}:chan:{job_id}",
                   shard=ShardKeys.of(shard_of(job_id)))

    def as_list(self) -> list[str]:
        s = self.shard
        return [self.record, self.events, self.channel, s.leases, s.queued, s.deadlines, s.notify, s.counts]


# Counters kept by the job transitions (lua/common.lua `count`), one share per shard in
# `ShardKeys.counts` (a tenant's jobs spread over every shard, so no single slot could hold
# them); api_client/counters.py sums the shares in one pipelined round trip.
JOB_KINDS = ("interactive", "batch")
LIVE_STATES = ("queued", "running")


def tenant_field(tenant: str, kind: str, state: str) -> str:
    """A tenant's jobs of one kind (interactive, batch) in one live state (queued, running)."""
    return f"t|{tenant}|{kind}|{state}"


def batch_field(batch_id: str, state: str) -> str:
    """A batch's jobs in one state (queued, running, succeeded, failed, cancelled)."""
    return f"b|{batch_id}|{state}"


def job(job_id: str) -> str:
    """The job record (a hash)."""
    return JobKeys.of(job_id).record


def events(job_id: str) -> str:
    return JobKeys.of(job_id).events


def events_channel(job_id: str) -> str:
    return JobKeys.of(job_id).channel


def idempotency(key: str, shard: int) -> str:
    """job_id of the job first submitted with this idempotency key (in the job's shard)."""
    return f"{_tag(shard)}:idem:{key}"


def idempotency_shard(key: str) -> int:
    """The shard a job submitted with this idempotency key lives in (so both keys share a slot)."""
    return zlib.crc32(key.encode()) % SHARDS


INTERNAL_TENANT = "internal"  # the direct JobClient's tenant: trusted in-cluster producers


@dataclass(frozen=True)
class TenantKeys:
    """One tenant's admission state (api_client/quotas.py), under the tenant's own hash tag."""

    active: str  # sorted set: job_id -> submit time, for the tenant's jobs that may still be queued or running
    bucket: str  # hash: the submit-rate token bucket (tokens, at)
    batch_bucket: str  # hash: the batch-submit token bucket (tokens, at)
    held: str  # hash: batch_id -> its jobs not yet ended, "bytes:<batch_id>" -> their request bytes (quotas.py)
    backlog: str  # list: the tenant's batch jobs not yet released to the workers (api_client/lanes.py)
    lane: str  # sorted set: released batch job_id -> release time, while it may still be queued
    streams: str  # sorted set: open SSE stream id -> when it lapses unless renewed

    @classmethod
    def of(cls, tenant: str) -> TenantKeys:
        t = f"{{{PREFIX}:tenant:{tenant}}}"
        return cls(active=f"{t}:active", bucket=f"{t}:bucket", batch_bucket=f"{t}:batch_bucket", held=f"{t}:held",
                   backlog=f"{t}:backlog", lane=f"{t}:lane", streams=f"{t}:streams")


def all_shards() -> list[ShardKeys]:
    return [ShardKeys.of(n) for n in range(SHARDS)]


def job_pattern() -> str:
    """SCAN pattern matching every job record (operators and tests)."""
    return f"{{{PREFIX}:*}}:job:*"


@dataclass(frozen=True)
class BatchKeys:
    """One batch (worker/http/batch_store.py), under the batch's own hash tag."""

    record: str  # hash: tenant, state, counts, callback, results_url
    jobs: str  # list of "custom_id<TAB>job_id", in input order

    @classmethod
    def of(cls, batch_id: str) -> BatchKeys:
        t = f"{{{PREFIX}:batch:{batch_id}}}"
        return cls(record=f"{t}:batch", jobs=f"{t}:jobs")


OPEN_BATCHES = f"{PREFIX}:batches:open"  # sorted set: batch_id -> created, until its results are written
BATCH_TENANTS = f"{PREFIX}:batches:tenants"  # sorted set: tenant -> last backlog push; the releaser's round

# The scaling signal: every job that waits, whatever holds it (an interactive job's broker
# message, a tenant's batch backlog, a released lane, a worker's prefetch). A sorted set,
# job_id -> when it was (re)queued; the job scripts (lua/common.lua) add a job when it
# becomes `queued` and remove it when it leaves, in the same script as the change, so
# ZCARD is exact, and running a script twice changes nothing (ZADD/ZREM of one member).
# KEDA's redis scalers read it: their length script takes ZCARD of a sorted set.
WAITING = f"{PREFIX}:waiting"


def waiting_key(job_id: str, clustered: bool = False) -> str:
    """The waiting set a job's scripts update: `WAITING`, or on a Redis Cluster (where a script
    may touch its job's slot only) its shard's share, `{ivq:<n>}:waiting`."""
    return f"{_tag(shard_of(job_id))}:waiting" if clustered else WAITING


def waiting_keys(clustered: bool = False) -> list[str]:
    """Every key whose ZCARDs add up to the jobs that wait."""
    return [f"{_tag(n)}:waiting" for n in range(SHARDS)] if clustered else [WAITING]


# Keys outside the job state machine (one each; no script spans them and a job's keys).
DEAD_CALLBACKS = f"{PREFIX}:callbacks:dead"  # list of dead callback deliveries (JSON)
WORKERS = f"{PREFIX}:workers"  # hash: worker_id -> last heartbeat JSON, for operators
