"""Exceptions the client raises. Everything derives from ApiError.

    ApiError
    ├── RequestRejected   the request failed validation at submit (has .code)
    ├── JobNotFound       no record for this job id (never existed or expired)
    ├── WaitTimeout       wait() gave up before the job ended
    └── BrokerUnavailable Redis could not be reached (raised, never a hang)
"""

from __future__ import annotations


class ApiError(Exception):
    code = "internal_error"


class RequestRejected(ApiError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class JobNotFound(ApiError):
    code = "not_found"


class WaitTimeout(ApiError):
    code = "timeout"


class BrokerUnavailable(ApiError):
    code = "broker_unavailable"
