"""The HTTP API's wire rules shared by its routes: one error shape, status by code, capped bodies.

    {"error": {"code": "<ErrorCode>", "message": "..."}}   with the HTTP status STATUS_OF gives
"""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.responses import JSONResponse

from api_client.errors import QuotaExceeded, RateLimited, RequestRejected, ServiceError, Unauthorized
from api_client.schema import ErrorCode

STATUS_OF: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 422, ErrorCode.forbidden_url: 422, ErrorCode.media_not_found: 422,
    ErrorCode.unauthorized: 401, ErrorCode.not_found: 404, ErrorCode.conflict: 409, ErrorCode.rate_limited: 429,
    ErrorCode.quota_exceeded: 429, ErrorCode.broker_unavailable: 503, ErrorCode.storage_unavailable: 503,
    ErrorCode.invalid_schema: 422, ErrorCode.unsupported_schema_feature: 422, ErrorCode.invalid_regex: 422,
    ErrorCode.empty_choices: 422, ErrorCode.schema_too_large: 422,
}
ERRORS_DOC = "\n".join(f"- `{code.value}`: HTTP {status}" for code, status in STATUS_OF.items()) + (
    "\n- a body that is not JSON: HTTP 400 `invalid_request`; a body over the limit: HTTP 413 `invalid_request`")


UNAVAILABLE_RETRY_AFTER_S = 2


class BodyTooLarge(RequestRejected):
    pass


class MalformedBody(RequestRejected):
    pass


def error_response(exc: ServiceError) -> JSONResponse:
    status = 413 if isinstance(exc, BodyTooLarge) else 400 if isinstance(exc, MalformedBody) else \
        STATUS_OF.get(exc.code, 500)
    headers = {}
    if isinstance(exc, (RateLimited, QuotaExceeded)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif exc.retryable:  # Redis or the store unreachable (a failover takes seconds): try again soon
        headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"code": exc.code.value, "message": exc.message}}, status, headers=headers)


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (before any parsing)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
