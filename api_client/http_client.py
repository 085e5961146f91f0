"""HttpJobClient: JobClient's methods over the HTTP API, for producers outside the cluster.

    client = HttpJobClient("https://ivq.example.com", api_key="ivq_...")
    job_id = client.submit(JobRequest.simple("Describe.", images=["s3://media/a.jpg"]))
    for text in client.stream(job_id):   # the output as it grows
        print(text, end="")
    print(client.result(job_id).usage)

Errors come back as the same exceptions JobClient raises (api_client/errors.py),
built from the API's `{"error": {"code", "message"}}` body.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

import httpx

from api_client.errors import (
    BrokerUnavailable,
    Conflict,
    JobNotFound,
    QuotaExceeded,
    RateLimited,
    RequestRejected,
    ServiceError,
    Unauthorized,
    WaitTimeout,
)
from api_client.schema import ErrorCode, JobRequest, JobResult, JobState, JobStatus

_SIMPLE = {ErrorCode.invalid_request: RequestRejected, ErrorCode.unauthorized: Unauthorized,
           ErrorCode.conflict: Conflict, ErrorCode.broker_unavailable: BrokerUnavailable,
           **{code: RequestRejected for code in (ErrorCode.invalid_schema, ErrorCode.unsupported_schema_feature,
                                                 ErrorCode.invalid_regex, ErrorCode.empty_choices,
                                                 ErrorCode.schema_too_large)}}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = ErrorCode(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        raise ServiceError(f"HTTP {response.status_code}: {response.text[:200]}") from None
    if code is ErrorCode.not_found:
        raise JobNotFound(message)
    if code in (ErrorCode.rate_limited, ErrorCode.quota_exceeded):
        cls = RateLimited if code is ErrorCode.rate_limited else QuotaExceeded
        raise cls(message, retry_after_s=float(response.headers.get("Retry-After", "1")))
    raise _SIMPLE.get(code, ServiceError)(message, code=code)


class HttpJobClient:
    """Submit, follow and cancel jobs through the HTTP API. Thread-safe (one httpx.Client)."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise BrokerUnavailable(f"the API is unreachable: {type(exc).__name__}") from exc
        _raise_for(response)
        return response.json()

    # ---- jobs ----------------------------------------------------------
    def submit(self, request: JobRequest | dict[str, Any], *, idempotency_key: str | None = None) -> str:
        body = request.model_dump(mode="json", exclude_none=True) if isinstance(request, JobRequest) else request
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return str(self._call("POST", "/v1/jobs", json=body, headers=headers)["job_id"])

    def submit_many(self, requests: Iterable[JobRequest | dict[str, Any]]) -> list[str]:
        return [self.submit(r) for r in requests]

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def result(self, job_id: str) -> JobResult | None:
        """The result of a succeeded job (None while it has not succeeded)."""
        try:
            return JobResult.model_validate(self._call("GET", f"/v1/jobs/{job_id}/result"))
        except Conflict:
            return None

    def cancel(self, job_id: str) -> JobStatus:
        try:
            return JobStatus.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))
        except Conflict:  # it had already ended: say how
            return self.status(job_id)

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, data) of every Server-Sent Event until the job ends: kind is "state" or "delta".

        A dropped connection is resumed from the last event id, so nothing repeats or goes missing."""
        end = None if timeout is None else time.monotonic() + timeout
        last_id: str | None = None
        while end is None or time.monotonic() < end:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            read = None if end is None else max(0.1, end - time.monotonic())
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=read)) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    for kind, data, event_id in _parse_sse(response.iter_lines()):
                        last_id = event_id or last_id
                        yield kind, data
                        if kind == "state" and JobState(data["state"]).terminal:
                            return
            except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError):
                continue  # reconnect with Last-Event-ID
        raise WaitTimeout(f"job {job_id} still running after {timeout}s")

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        for _ in self.events(job_id, timeout=timeout):
            pass
        return self.status(job_id)

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[str]:
        """The output text as it grows; joined, the pieces equal the result's output_text."""
        for kind, data in self.events(job_id, timeout=timeout):
            if kind == "delta":
                yield data["text"]

    # ---- batches -------------------------------------------------------
    def submit_batch(self, lines: Iterable[dict[str, Any]] | str | bytes | IO[bytes], *, partial: bool = False,
                     callback_url: str | None = None) -> dict[str, Any]:
        """Submit a batch: dicts ({"custom_id", "request"}), a JSONL text, or an open JSONL file
        (streamed). Returns batch_id, accepted and the rejected lines (with partial=True;
        otherwise a bad line raises RequestRejected)."""
        body: Any = lines if isinstance(lines, (str, bytes, io.IOBase)) else \
            "".join(json.dumps(x) + "\n" for x in lines)
        params: dict[str, Any] = {"partial": "true" if partial else "false"}
        if callback_url:
            params["callback_url"] = callback_url
        response = self.http.post("/v1/native/batches", content=body, params=params,
                                  headers={"Content-Type": "application/jsonl"})
        if response.status_code == 422 and "lines" in response.json():
            lines_bad = response.json()["lines"]
            raise RequestRejected("; ".join(f"line {x['line']}: {x['message']}" for x in lines_bad[:10]))
        _raise_for(response)
        return dict(response.json())

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's state and its jobs' counts by state."""
        return dict(self._call("GET", f"/v1/native/batches/{batch_id}"))

    def batch_results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """A completed batch's results, one dict a line, in input order."""
        with self.http.stream("GET", f"/v1/native/batches/{batch_id}/results") as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HttpJobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    kind, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads("\n".join(data)), event_id
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
