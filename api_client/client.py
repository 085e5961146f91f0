"""JobClient: what a producer uses to submit jobs and learn how they ended.

The job record in Redis is the source of truth; the Celery message sent here
is only how a worker hears of the job. `wait` and `events` block on the
job's pub/sub channel (no sleep loop), re-reading the record after
subscribing so a transition that happened in between is never missed.
`stream` follows a running job's text the same way: the worker writes the
settled text so far to the record (worker/jobs/progress.py, every
IVQ_PROGRESS_INTERVAL_S at most) and announces it on that channel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from api_client import keys
from api_client.dispatch import Dispatcher, producer_app
from api_client.errors import BrokerUnavailable, JobNotFound, RequestRejected, WaitTimeout
from api_client.formats import FormatRejected, compile_format
from api_client.jobstate import JobStore
from api_client.redis_conn import Durability, default_durability, sync_client
from api_client.quotas import Limits, Quotas
from api_client.schema import MAX_REQUEST_BYTES, JobRequest, JobResult, JobState, JobStatus


class JobClient:
    """Submit, follow and cancel jobs. Thread-safe; one per process is enough."""

    def __init__(self, redis_url: str, *, socket_timeout: float = 10.0, tenant: str = keys.INTERNAL_TENANT,
                 durability: Durability | str | None = None):
        """`redis_url`: redis://... or redis+sentinel://... (api_client/redis_conn.py). `durability`:
        "replica" (WAIT for a replica before a submit is acknowledged), "local", or a `Durability`;
        None: replica for a Sentinel URL, local otherwise."""
        self.redis_url = redis_url
        self.tenant = tenant  # whose jobs this client submits; the direct client is trusted with every job
        self.redis = sync_client(redis_url, socket_timeout=socket_timeout)
        self.durability = durability if isinstance(durability, Durability) else default_durability(
            redis_url, durability)
        self.jobs = JobStore(self.redis, durability=self.durability)
        self.quotas = Quotas(self.redis)
        self.dispatch = Dispatcher(producer_app(redis_url))

    # ---- submitting -------------------------------------------------
    def submit(self, request: JobRequest | dict[str, Any] | str, *, tenant: str | None = None,
               limits: Limits | None = None, batch_id: str = "", priority: int | None = None) -> str:
        """Validate, record and enqueue one job; returns its id.

        Raises RequestRejected(code="invalid_request") for a malformed request, and with the
        format's own code (invalid_schema, unsupported_schema_feature, invalid_regex,
        empty_choices, schema_too_large) for a response_format that cannot be enforced.
        Submitting twice with the same idempotency_key returns the first job's id.
        BrokerUnavailable: Redis or the broker cannot be reached, or (durability `replica`) no
        replica confirmed the record in time; then the record is withdrawn if Redis still
        answers, else the job may still run (retry with an idempotency_key).
        With `limits` (the HTTP API's tenants), the submit is admitted first and a
        refusal (RateLimited, QuotaExceeded) records and enqueues nothing.
        """
        req = self._validate(request)
        tenant = tenant or self.tenant
        job_id = self.jobs.new_job_id(req.idempotency_key, tenant)
        body = req.model_dump_json(exclude_none=True)
        deadline = req.deadline.timestamp() if req.deadline else None
        priority = req.priority if priority is None else priority
        with self._broker_errors():
            now = time.time()
            if limits is not None:
                self.quotas.admit(tenant, job_id, limits, now=now)
            created = self.jobs.create(
                job_id, body, now=now, priority=priority, deadline=deadline,
                idempotency_key=req.idempotency_key, tenant=tenant, batch_id=batch_id,
            )
            if created.done:
                self.dispatch.run_job(job_id, priority)
            elif limits is not None:
                self.quotas.release(tenant, job_id)  # the earlier job holds the request
        return created.job_id

    def submit_many(self, requests: Iterable[JobRequest | dict[str, Any]]) -> list[str]:
        """Submit several jobs; every request is validated before any is enqueued."""
        validated = [self._validate(r) for r in requests]
        return [self.submit(r) for r in validated]

    @staticmethod
    def _validate(request: JobRequest | dict[str, Any] | str) -> JobRequest:
        req = JobClient._parse(request)
        check_format(req)
        return req

    @staticmethod
    def _parse(request: JobRequest | dict[str, Any] | str) -> JobRequest:
        if isinstance(request, JobRequest):
            return request
        try:
            if isinstance(request, (str, bytes)):
                if len(request) > MAX_REQUEST_BYTES:
                    raise RequestRejected(f"request over {MAX_REQUEST_BYTES} bytes")
                return JobRequest.model_validate_json(request)
            if len(json.dumps(request, default=str)) > MAX_REQUEST_BYTES:
                raise RequestRejected(f"request over {MAX_REQUEST_BYTES} bytes")
            return JobRequest.model_validate(request)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise RequestRejected(problems) from None

    # ---- reading ----------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        with self._broker_errors():
            rec = self.jobs.raw(job_id)
        if not rec:
            raise JobNotFound(job_id)
        return JobStatus.from_record(rec)

    def result(self, job_id: str) -> JobResult | None:
        """The result of a succeeded job (None while it has not succeeded)."""
        with self._broker_errors():
            raw = self.jobs.result_json(job_id)
            if raw is None and not self.jobs.exists(job_id):
                raise JobNotFound(job_id)
        return JobResult.model_validate_json(raw) if raw else None

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """Block until the job ends; raises WaitTimeout after `timeout` seconds."""
        status = self.status(job_id)  # one read; a job that already ended needs no subscription
        if status.state.terminal:
            return status
        for _ in self.events(job_id, timeout=timeout):
            pass
        status = self.status(job_id)
        if not status.state.terminal:
            raise WaitTimeout(f"job {job_id} still {status.state.value} after {timeout}s")
        return status

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the job's events (past ones first) until it ends or `timeout` passes."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._broker_errors():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(keys.events_channel(job_id))
            try:
                seen = 0
                past = self.jobs.events(job_id)
                if not past and not self.jobs.exists(job_id):
                    raise JobNotFound(job_id)
                for ev in past:
                    seen += 1
                    yield ev
                    if _is_terminal(ev):
                        return
                while end is None or time.monotonic() < end:
                    left = 1.0 if end is None else max(0.0, min(1.0, end - time.monotonic()))
                    msg = pubsub.get_message(timeout=left)
                    if msg is None or _is_progress(msg):  # a progress snapshot is no event: nothing to read
                        continue
                    # Read from the list, not the message: the list has every event in order.
                    for ev in self.jobs.events(job_id, start=seen):
                        seen += 1
                        yield ev
                        if _is_terminal(ev):
                            return
            finally:
                pubsub.close()

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[str]:
        """Yield the job's output text as it grows, in pieces: "".join(pieces) == result(job_id).output_text.

        Each progress snapshot of the running job yields the text it adds; success yields the
        rest of the final text. Failed or cancelled: it just ends (read `status`). Raises
        WaitTimeout after `timeout` seconds. Only the continuous engine reports progress; without
        it the whole text comes at the end.
        """
        end = None if timeout is None else time.monotonic() + timeout
        sent = ""
        with self._broker_errors():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(keys.events_channel(job_id))
            try:
                while True:  # read the record after subscribing, then again after every message
                    raw_state, raw_text = self.redis.hmget(keys.job(job_id), "state", "progress_text")
                    if raw_state is None:
                        raise JobNotFound(job_id)
                    state = JobState(_str(raw_state))
                    if state is JobState.succeeded:
                        result = self.result(job_id)
                        if result is not None and len(result.output_text) > len(sent):
                            yield result.output_text[len(sent):]
                        return
                    if state.terminal:
                        return
                    if state is JobState.running and raw_text and len(text := _str(raw_text)) > len(sent):
                        yield text[len(sent):]
                        sent = text
                    if end is not None and time.monotonic() >= end:
                        raise WaitTimeout(f"job {job_id} still {state.value} after {timeout}s")
                    left = 1.0 if end is None else max(0.0, min(1.0, end - time.monotonic()))
                    if pubsub.get_message(timeout=left) is not None:
                        while pubsub.get_message(timeout=0) is not None:
                            pass  # one read covers every message already here
            finally:
                pubsub.close()

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job (a running job's result is discarded)."""
        with self._broker_errors():
            self.dispatch.announce(self.jobs.cancel(job_id))
        return self.status(job_id)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _broker_errors(self) -> Iterator[None]:
        """Redis or kombu connection failures become one clear BrokerUnavailable."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {exc}") from exc
        except redis.ReadOnlyError as exc:  # a demoted primary, still, after the retries
            raise BrokerUnavailable(f"Redis is a replica now: {exc}") from exc
        except redis.ResponseError as exc:
            if "NOREPLICAS" not in str(exc):  # the primary's min-replicas-to-write refused the write
                raise
            raise BrokerUnavailable(f"Redis refused the write: {exc}") from exc
        except OperationalError as exc:  # kombu could not publish
            raise BrokerUnavailable(f"broker unreachable: {exc}") from exc


def check_format(request: JobRequest) -> None:
    """Refuse a response_format that cannot be enforced (api_client/formats.py), with its own code."""
    try:
        compile_format(request.response_format)
    except FormatRejected as exc:
        raise RequestRejected(exc.message, code=exc.code) from None


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _is_progress(message: dict[str, Any]) -> bool:
    try:
        return "progress" in json.loads(message["data"])
    except (TypeError, ValueError):
        return False


def _is_terminal(event: dict[str, Any]) -> bool:
    return JobState(event["state"]).terminal
