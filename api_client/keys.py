"""Redis key names, TTLs and queue names: the one place both sides read.

Every key the service writes carries a TTL; nothing here lives forever.
"""

from __future__ import annotations

PREFIX = "ivq"

# Celery queues and task names (the client sends tasks by name; it never
# imports the worker).
INFER_QUEUE = "infer"
CALLBACKS_QUEUE = "callbacks"
INFER_TASK = "ivq.infer"
CALLBACK_TASK = "ivq.deliver_callback"
NOTIFY_TASK = "ivq.notify"  # (job_id, event): build and send the callback for one event

# Redis broker priorities: kombu keeps one list per step, named
# "infer", "infer:3", "infer:6", "infer:9"; KEDA must count all of them.
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
    """The Redis lists that hold pending inference messages (for autoscaling)."""
    return [INFER_QUEUE] + [f"{INFER_QUEUE}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS[1:]]


def celery_priority(request_priority: int) -> int:
    """Our priority is 0 (normal) .. 9 (most urgent); kombu's redis runs lower numbers first."""
    return 9 - request_priority


# TTLs (seconds)
JOB_TTL_S = 7 * 24 * 3600  # job record, including the short result copy
IDEMPOTENCY_TTL_S = 24 * 3600
EVENTS_TTL_S = 24 * 3600
DEAD_LETTER_TTL_S = 14 * 24 * 3600


def job(job_id: str) -> str:
    """Hash: the job record (state, request JSON, timestamps, claim, result preview)."""
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    """List of JSON events for one job (appended on each transition)."""
    return f"{PREFIX}:events:{job_id}"


def events_channel(job_id: str) -> str:
    """Pub/sub channel on which each transition of one job is announced."""
    return f"{PREFIX}:chan:{job_id}"


def idempotency(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


# Sorted set: job_id -> lease expiry (unix seconds) for every running job;
# the sweeper requeues members whose lease has passed.
LEASES = f"{PREFIX}:leases"

# Sorted set: "job_id|event" -> time, for every callback an event owes whose
# notify task has not run yet; the sweeper re-sends the ones that linger.
PENDING_NOTIFY = f"{PREFIX}:notify"

# List of dead callback deliveries (JSON), for `internvl-queue callbacks dead/replay`.
DEAD_CALLBACKS = f"{PREFIX}:callbacks:dead"

# Hash of worker_id -> last heartbeat JSON, for operators.
WORKERS = f"{PREFIX}:workers"
