"""The HTTP API: the only thing producers talk to (`internvl-queue api`).

FastAPI on uvicorn, stateless, CPU only. Every call but the probes carries
`Authorization: Bearer ivq_...`, which names a tenant (worker/http/tenants.py). A
tenant sees only its own jobs: another tenant's job id answers 404, exactly
like an unknown one, so ids do not leak. Submits are admitted against the
tenant's rate and cap (api_client/quotas.py); a refusal is 429 with
`Retry-After`, and nothing is recorded or enqueued. So are batches
(worker/http/batch_routes.py) and event streams (at most `max_streams` open per
tenant; all of one process's streams share one pub/sub connection, events.py).

/metrics has, per tenant of the keys file (never a name from a request), its jobs
queued and running by kind, its batch backlog and holdings, its open streams, and
the refusals by reason.

Errors have one shape, `{"error": {"code", "message"}}`, with the stable
`ErrorCode`s (README, "Error codes") and the HTTP status below. The OpenAI-compatible
routes (/v1/chat/completions, /v1/models, /v1/files, /v1/batches: openai_*.py) answer
OpenAI's shape instead, `{"error": {"message", "type", "param", "code"}}`, the same code
in `code`. The native batch routes are /v1/native/batches (batch_routes.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from api_client.client import JobClient
from api_client.counters import Counters
from api_client.errors import (
    BrokerUnavailable,
    Conflict,
    JobNotFound,
    QuotaExceeded,
    RateLimited,
    RequestRejected,
    ServiceError,
)
from api_client.lanes import Lanes
from api_client.redis_conn import Durability, async_client
from api_client.schema import MAX_REQUEST_BYTES, ErrorCode, JobRequest, JobResult, JobStatus
from worker.http.batch_routes import BatchRoutes
from worker.http.events import KEEPALIVE_S, Fanout, event_stream
from worker.http import openai_wire
from worker.http.openai_chat import ChatRoutes
from worker.http.tenants import Tenant, TenantRegistry
from worker.http.wire import ERRORS_DOC, BodyTooLarge, MalformedBody, error_response, read_capped

Auth = Annotated[str | None, Header(alias="Authorization", include_in_schema=False)]


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ivq_api_requests", "HTTP requests, by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("ivq_api_request_seconds", "HTTP request time, by route", ["route"],
                                 registry=self.registry)
        # Per tenant: the label's values come from the keys file only (TenantRegistry.names).
        self.refusals = Counter("ivq_api_refusals", "429s, by tenant, what was refused and why",
                                ["tenant", "kind", "reason"], registry=self.registry)
        self.tenant_jobs = Gauge("ivq_tenant_jobs", "Jobs queued or running, by tenant and kind",
                                 ["tenant", "kind", "state"], registry=self.registry)
        self.tenant_backlog = Gauge("ivq_tenant_batch_backlog", "Batch jobs not yet released to the workers",
                                    ["tenant"], registry=self.registry)
        self.tenant_lane = Gauge("ivq_tenant_batch_released", "Batch jobs released and still waiting for a worker",
                                 ["tenant"], registry=self.registry)
        self.tenant_held = Gauge("ivq_tenant_batch_held_jobs", "Batch jobs held against the tenant's quota",
                                 ["tenant"], registry=self.registry)
        self.tenant_streams = Gauge("ivq_tenant_streams", "Open event streams", ["tenant"], registry=self.registry)

    def collect_tenants(self, client: JobClient, names: list[str]) -> None:
        """Refresh the per-tenant gauges from Redis (on each scrape): a few pipelined round trips."""
        counts = Counters(client.redis).tenants(names)
        backlog = Lanes(client.redis).backlog(names)
        for name in names:
            for kind, states in counts[name].items():
                for state, n in states.items():
                    self.tenant_jobs.labels(tenant=name, kind=kind, state=state).set(n)
            self.tenant_backlog.labels(tenant=name).set(backlog[name][0])
            self.tenant_lane.labels(tenant=name).set(backlog[name][1])
            self.tenant_held.labels(tenant=name).set(client.quotas.held(name)[0])
            self.tenant_streams.labels(tenant=name).set(client.quotas.streams(name, now=time.time()))


def create_api(redis_url: str, tenants: TenantRegistry, *, batches: BatchRoutes | None = None,
               redis_connections: int = 16, served_model: str = "tiny",
               durability: Durability | str | None = None) -> FastAPI:
    """The ASGI app. `batches` (worker/http/batch_routes.py, it needs the object store) adds the batch
    routes, native and OpenAI's, and /v1/files; with it, chat completions take data: URLs (stored there).
    `redis_connections` bounds the event streams' pool (one more is the shared pub/sub).
    `served_model` is the model the workers serve (IVQ_MODEL): the OpenAI routes' `model`.
    `durability`: as JobClient's (a submit, a batch included, is acknowledged once that durable; else 503)."""
    client = JobClient(redis_url, durability=durability)
    aio = async_client(redis_url, max_connections=redis_connections)  # the event streams' reads
    fanout = Fanout(redis_url)  # their one pub/sub connection
    metrics = ApiMetrics()
    app = FastAPI(title="internvl-queue", version="1",
                  description="Queued InternVL jobs over images and videos in object storage.\n\n"
                              "Errors are `{\"error\": {\"code\", \"message\"}}`:\n\n" + ERRORS_DOC +
                              "\n\nThe OpenAI-compatible routes (tag `openai`: /v1/chat/completions, /v1/models, "
                              "/v1/files, /v1/batches) answer OpenAI's `{\"error\": {\"message\", \"type\", "
                              "\"param\", \"code\"}}`, the same codes in `code`.")
    app.state.client, app.state.tenants = client, tenants
    _document_job_request(app)

    def respond(request: Request, exc: ServiceError) -> JSONResponse:
        if not openai_wire.is_openai_path(request.url.path):
            return error_response(exc)
        status = 413 if isinstance(exc, BodyTooLarge) else 400 if isinstance(exc, MalformedBody) else None
        return openai_wire.error_response(exc, status=status)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, (RateLimited, QuotaExceeded)):
            _count_refusal(request, exc)
        return respond(request, exc)

    def _count_refusal(request: Request, exc: ServiceError) -> None:
        try:
            name = tenants.authenticate(request.headers.get("authorization")).name
        except ServiceError:
            return
        path = request.url.path
        kind = "stream" if path.endswith("/events") else \
            "batch" if path.startswith(("/v1/batches", "/v1/native/batches", "/v1/files")) else "job"
        metrics.refusals.labels(tenant=name, kind=kind, reason=exc.code.value).inc()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The router's own refusals (no such route, wrong method) in the one error shape.
        code = ErrorCode.not_found if exc.status_code == 404 else ErrorCode.invalid_request
        if openai_wire.is_openai_path(request.url.path):
            return JSONResponse(openai_wire.error_body(str(exc.detail), exc.status_code, code.value), exc.status_code)
        return JSONResponse({"error": {"code": code.value, "message": str(exc.detail)}}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        if openai_wire.is_openai_path(request.url.path):
            param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            return openai_wire.error_response(openai_wire.OpenAIError(f"{where}: {first.get('msg')}", param=param))
        return error_response(RequestRejected(f"{where}: {first.get('msg')}"))

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return respond(request, BrokerUnavailable(f"Redis unreachable: {type(exc).__name__}"))

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "other")
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        metrics.latency.labels(route=route).observe(time.perf_counter() - started)
        response.headers["x-request-id"] = request.headers.get("x-request-id") or "req_" + uuid.uuid4().hex
        return response

    def tenant_of(authorization: str | None) -> Tenant:
        return tenants.authenticate(authorization)

    def owned(job_id: str, tenant: Tenant) -> None:
        """404 for an unknown job and for another tenant's job alike."""
        if client.jobs.tenant_of(job_id) != tenant.name:
            raise JobNotFound(job_id)

    @app.post("/v1/jobs", status_code=202, summary="Submit a job (a JobRequest)", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
    async def submit(request: Request, authorization: Auth = None,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> JSONResponse:
        tenant = tenant_of(authorization)
        body = await read_capped(request, MAX_REQUEST_BYTES)
        try:
            data = json.loads(body)
        except ValueError:
            raise MalformedBody("the body is not JSON") from None
        if not isinstance(data, dict):
            raise MalformedBody("the body must be a JSON object (a JobRequest)")
        if idempotency_key is not None:
            data["idempotency_key"] = idempotency_key

        def record() -> tuple[str, JobStatus]:  # Redis calls block: off the event loop
            job_id = client.submit(data, tenant=tenant.name, limits=tenant.limits)
            return job_id, client.status(job_id)

        job_id, status = await run_in_threadpool(record)
        return JSONResponse({"job_id": job_id, "status": status.model_dump(mode="json")}, 202)

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, summary="A job's status (and progress while it runs)")
    def status(job_id: str, authorization: Auth = None) -> JobStatus:
        owned(job_id, tenant_of(authorization))
        return client.status(job_id)

    @app.get("/v1/jobs/{job_id}/result", response_model=JobResult, summary="A succeeded job's result")
    def result(job_id: str, authorization: Auth = None) -> JobResult:
        owned(job_id, tenant_of(authorization))
        found = client.result(job_id)
        if found is None:
            raise Conflict(f"job {job_id} is {client.status(job_id).state.value}: no result")
        return found

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus, summary="Cancel a queued or running job")
    def cancel(job_id: str, authorization: Auth = None) -> JobStatus:
        tenant = tenant_of(authorization)
        owned(job_id, tenant)
        before = client.status(job_id)
        if before.state.terminal:
            raise Conflict(f"job {job_id} already ended {before.state.value}")
        after = client.cancel(job_id)
        client.quotas.release(tenant.name, job_id)
        return after

    @app.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events: state changes and text deltas")
    async def events(job_id: str, authorization: Auth = None,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None) -> StreamingResponse:
        tenant = tenant_of(authorization)
        await run_in_threadpool(owned, job_id, tenant)
        stream_id = uuid.uuid4().hex
        lapse_s = 3 * KEEPALIVE_S

        def hold() -> None:
            client.quotas.open_stream(tenant.name, stream_id, tenant.limits, now=time.time(), lapse_s=lapse_s)

        await run_in_threadpool(hold)  # 429 past the tenant's max_streams

        async def renew() -> None:
            try:
                await run_in_threadpool(hold)
            except QuotaExceeded:
                pass  # it lapsed while the process stalled and the cap filled: it still ends normally

        async def closed() -> None:
            await run_in_threadpool(client.quotas.close_stream, tenant.name, stream_id)

        stream: AsyncIterator[str] = event_stream(aio, fanout, job_id, last_event_id, renew=renew, closed=closed)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        try:
            ok = bool(client.redis.ping())
        except redis.RedisError:
            ok = False
        return JSONResponse({"ok": ok, "reason": "ok" if ok else "redis unreachable"}, 200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        try:
            metrics.collect_tenants(client, tenants.names())
        except redis.RedisError:
            pass  # the request metrics still answer; the tenant gauges keep their last values
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    chat = ChatRoutes(client, aio, fanout, tenant_of, served_model=served_model,
                      store=batches.store if batches is not None else None)
    chat.mount(app)
    if batches is not None:
        batches.mount(app, client, tenant_of)
        batches.mount_openai(app, client, tenant_of, chat)
    app.router.on_shutdown.append(client.close)
    app.router.on_shutdown.append(fanout.aclose)
    app.router.on_shutdown.append(aio.aclose)
    app.state.fanout = fanout
    return app


def _document_job_request(app: FastAPI) -> None:
    """/v1/jobs reads its body itself (size cap first, then JobClient's checks), so OpenAPI is told its schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()  # FastAPI keeps it in app.openapi_schema: amended once
        request = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in {**request.pop("$defs", {}), "JobRequest": request}.items():
            schemas.setdefault(name, schema)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
