"""What happens to a job after an error: decided here, once, by the exception's class.

Task bodies do not grow try/except ladders: they let exceptions rise, and
`classify` maps each one, most specific class first (like httpx's
`map_exceptions`), to
- FAIL    the job ends failed at once with a stable code (bad input, a bug),
- RETRY   a transient fault: back to the queue after `backoff_delay`, counting an attempt,
- REQUEUE the worker is going away: hand the job back without counting it,
- STOP    the job's claim is gone (cancelled, taken over): nothing is left to write.

Errors the service names carry their own (code, retryable): `ServiceError`
(api_client/errors.py) and its subclasses, among them `JobFailed` below, the
storage errors and `ForbiddenURL`; the model runtime's `RequestError` has the
same shape. Anything else is matched in `_FOREIGN`, or is an internal error.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from api_client.errors import ServiceError
from api_client.schema import ErrorCode
from model_runtime.types import DeadlineExceeded, GenerationFailed, RequestCancelled, RequestError
from worker.model.batcher import BatcherClosed


class Action(str, enum.Enum):
    FAIL = "fail"
    RETRY = "retry"
    REQUEUE = "requeue"
    STOP = "stop"


@dataclass(frozen=True)
class Classified:
    action: Action
    code: ErrorCode
    message: str


class JobFailed(ServiceError):
    """A job-level failure with a known code, raised by the worker's own steps (media fetch, ...)."""


class Draining(Exception):
    """The worker is shutting down before this job reached the model."""


# Exceptions from outside the service's own tree, most specific first. Each row:
# (classes, action, code). Subclasses match their parent's row.
_FOREIGN: list[tuple[tuple[type[BaseException], ...], Action, ErrorCode]] = [
    ((BatcherClosed, Draining), Action.REQUEUE, ErrorCode.internal_error),
    ((RequestCancelled,), Action.STOP, ErrorCode.cancelled),  # the record already says cancelled
    ((DeadlineExceeded,), Action.RETRY, ErrorCode.timeout),  # the engine ended it at IVQ_JOB_TIMEOUT_S
    ((GenerationFailed,), Action.FAIL, ErrorCode.internal_error),  # the model raised on this request's batch
    ((ValidationError,), Action.FAIL, ErrorCode.invalid_request),
    # A wait on the model thread ran out (concurrent.futures.TimeoutError and socket.timeout are
    # this builtin since Python 3.11). Before the connection row: TimeoutError is an OSError too.
    ((TimeoutError,), Action.RETRY, ErrorCode.timeout),
    ((redis.ConnectionError, redis.TimeoutError, ConnectionError), Action.RETRY, ErrorCode.internal_error),
]


def classify(exc: BaseException) -> Classified:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, ServiceError):
        return Classified(Action.RETRY if exc.retryable else Action.FAIL, exc.code, exc.message)
    if isinstance(exc, RequestError):  # the request's own fault (media, prompt, size); its code is a wire code
        return Classified(Action.RETRY if exc.retryable else Action.FAIL, ErrorCode(exc.code), exc.message)
    for classes, action, code in _FOREIGN:
        if isinstance(exc, classes):
            if code is ErrorCode.invalid_request:
                msg = msg[:500]
            elif action is Action.RETRY and code is ErrorCode.internal_error:
                msg = f"transient: {msg}"
            return Classified(action, code, msg)
    return Classified(Action.FAIL, ErrorCode.internal_error, f"{type(exc).__name__}: {msg}")


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

    The one backoff of the service: job retries and callback retries both use it."""
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), 62))
    return (rng or random).uniform(0.0, ceiling)
