"""One exception tree for every error the service names.

    ServiceError (code, message, retryable)
    ├── RequestRejected    the request failed validation at submit (invalid_request)
    ├── JobNotFound        no record for this job id: never existed, or expired (not_found)
    ├── WaitTimeout        wait() gave up before the job ended (timeout)
    ├── BrokerUnavailable  Redis could not be reached; raised, never a hang (broker_unavailable)
    ├── Unauthorized       no valid API key (unauthorized; HTTP API only)
    ├── RateLimited        the tenant submits faster than its rate (rate_limited, retry_after_s)
    ├── QuotaExceeded      the tenant has its maximum of jobs queued or running (quota_exceeded)
    ├── Conflict           the job's state does not allow this: no result yet, already ended (conflict)
    └── raised in workers, and classified there by class (worker/jobs/errors.py):
        JobFailed (worker/jobs/errors.py), ForbiddenURL (worker/io/netguard.py) and the storage
        errors (worker/io/media_fetch.py: MediaNotFound, MediaTooLarge, ForbiddenMedia,
        StorageUnavailable)

`code` is always an `ErrorCode`, the stable codes clients branch on. `retryable`
says whether the same request may succeed later. The model runtime has its own
`model_runtime.types.RequestError` of the same shape: that package imports
nothing of this one, so the worker maps it by class.
"""

from __future__ import annotations

from api_client.schema import ErrorCode


class ServiceError(Exception):
    code: ErrorCode = ErrorCode.internal_error
    retryable: bool = False

    def __init__(self, message: str = "", *, code: ErrorCode | str | None = None, retryable: bool | None = None):
        if code is not None:
            self.code = ErrorCode(code)
        if retryable is not None:
            self.retryable = retryable
        self.message = message or self.code.value
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class RequestRejected(ServiceError):
    code = ErrorCode.invalid_request


class JobNotFound(ServiceError):
    code = ErrorCode.not_found

    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id} (never submitted, or its record expired)")
        self.job_id = job_id


class WaitTimeout(ServiceError):
    code = ErrorCode.timeout
    retryable = True


class BrokerUnavailable(ServiceError):
    code = ErrorCode.broker_unavailable
    retryable = True


class Unauthorized(ServiceError):
    code = ErrorCode.unauthorized


class Conflict(ServiceError):
    code = ErrorCode.conflict


class _TryLater(ServiceError):
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(_TryLater):
    code = ErrorCode.rate_limited


class QuotaExceeded(_TryLater):
    code = ErrorCode.quota_exceeded
