"""The error taxonomy: the one place that decides what happens after an error.

Task bodies do not grow try/except ladders: they let exceptions rise, and
`classify` says
- FAIL    the job ends failed at once with a stable code (bad input),
- RETRY   a transient fault: back to the queue with backoff, counting an attempt,
- REQUEUE the worker is going away: hand the job back without counting it.
"""

from __future__ import annotations

import enum
import random
import socket
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from api_client.schema import ErrorCode
from model_runtime.types import DeadlineExceeded, GenerationFailed, RequestCancelled, RequestError
from worker.batcher import BatcherClosed


class Action(str, enum.Enum):
    FAIL = "fail"
    RETRY = "retry"
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Classified:
    action: Action
    code: ErrorCode
    message: str


class JobFailed(Exception):
    """A job-level failure with a known code, raised by the worker's own steps (media fetch, ...)."""

    def __init__(self, code: ErrorCode | str, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = retryable


class Draining(Exception):
    """The worker is shutting down before this job reached the model."""


# Storage errors are matched by class name so this module stays importable
# without boto3, and so each module keeps its own exceptions.
_TERMINAL_BY_NAME = {
    "MediaNotFound": ErrorCode.media_not_found,
    "MediaTooLarge": ErrorCode.media_too_large,
    "ForbiddenMedia": ErrorCode.forbidden_url,
    "ForbiddenURL": ErrorCode.forbidden_url,
}
_TRANSIENT_BY_NAME = {"StorageUnavailable", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError"}


def classify(exc: BaseException) -> Classified:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, JobFailed):
        return Classified(Action.RETRY if exc.retryable else Action.FAIL, exc.code, exc.message)
    if isinstance(exc, (BatcherClosed, Draining)):
        return Classified(Action.REQUEUE, ErrorCode.internal_error, "worker shutting down")
    if isinstance(exc, RequestError):  # the request's own fault (media, prompt, size); codes are wire codes
        return Classified(Action.FAIL, ErrorCode(exc.code), exc.message)
    if isinstance(exc, GenerationFailed):  # the model raised on this request's batch: a worker fault
        return Classified(Action.FAIL, ErrorCode.internal_error, msg)
    if isinstance(exc, RequestCancelled):  # the record already says cancelled; this only ends the task
        return Classified(Action.FAIL, ErrorCode.cancelled, msg)
    if isinstance(exc, DeadlineExceeded):  # the engine ended it at IVQ_JOB_TIMEOUT_S
        return Classified(Action.RETRY, ErrorCode.timeout, msg)
    name = type(exc).__name__
    for cls in type(exc).__mro__:  # subclasses (e.g. InvalidMediaUrl < ForbiddenMedia) inherit a code
        if cls.__name__ in _TERMINAL_BY_NAME:
            return Classified(Action.FAIL, _TERMINAL_BY_NAME[cls.__name__], msg)
    if isinstance(exc, ValidationError):
        return Classified(Action.FAIL, ErrorCode.invalid_request, msg[:500])
    if any(cls.__name__ in _TRANSIENT_BY_NAME for cls in type(exc).__mro__):
        return Classified(Action.RETRY, ErrorCode.storage_unavailable, msg)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, socket.timeout, ConnectionError)):
        return Classified(Action.RETRY, ErrorCode.internal_error, f"transient: {msg}")
    if isinstance(exc, TimeoutError):
        return Classified(Action.RETRY, ErrorCode.timeout, msg)
    return Classified(Action.FAIL, ErrorCode.internal_error, f"{name}: {msg}")


def retry_delay(attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    rng = rng or random.Random()
    return rng.uniform(0, min(cap_s, base_s * (2 ** max(0, attempt))))
