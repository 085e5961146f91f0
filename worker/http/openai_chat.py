"""OpenAI's Chat Completions and Models on the service's queue (openai_wire.py has the wire format).

    POST /v1/chat/completions   one interactive job per choice (`n`), the tenant's quotas and rates
                                as for /v1/jobs; the request waits for them. `stream: true` sends
                                `chat.completion.chunk` events from the jobs' progress (events.py),
                                then `data: [DONE]`. A client that goes away cancels its jobs.
    GET  /v1/models             the served model; GET /v1/models/{id}

A job that fails answers the error its code maps to (openai_wire.STATUS_OF); after a stream has
started, as one `data: {"error": ...}` event.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api_client import keys
from api_client.client import JobClient
from api_client.errors import QuotaExceeded, ServiceError
from api_client.jobstate import as_text
from api_client.schema import ErrorCode, JobResult, JobState
from worker.http import openai_wire as wire
from worker.http.events import KEEPALIVE_S, Fanout, job_updates
from worker.http.tenants import Tenant
from worker.http.wire import MalformedBody, read_capped
from worker.io.results_store import ObjectStore


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ChatRoutes:
    def __init__(self, client: JobClient, aio: aioredis.Redis, fanout: Fanout,
                 tenant_of: Callable[[str | None], Tenant], *, served_model: str,
                 store: ObjectStore | None, created: int | None = None):
        self.client, self.aio, self.fanout, self.tenant_of = client, aio, fanout, tenant_of
        self.served_model, self.store = served_model, store
        self.created = created or int(time.time())

    # ---- shared with the batch routes -------------------------------------------------
    def sink_for(self, tenant: str) -> wire.MediaSink | None:
        """Where a request's data: URLs go: the object store, under the tenant, content-addressed."""
        store = self.store
        if store is None:
            return None

        def put(data: bytes, ext: str) -> str:
            key = wire.media_key(tenant, data, ext)
            if store.exists(key):
                return store.url_for(key)
            with tempfile.NamedTemporaryFile(suffix="." + ext) as f:
                f.write(data)
                f.flush()
                return store.put_file(key, Path(f.name))
        return put

    def model_object(self) -> dict[str, Any]:
        return {"id": self.served_model, "object": "model", "created": self.created, "owned_by": "internvl-queue"}

    # ---- jobs -------------------------------------------------------------------------
    def _submit(self, jobs: list[dict[str, Any]], tenant: Tenant) -> list[str]:
        """All or none: a refusal of choice i (429) cancels the choices before it."""
        job_ids: list[str] = []
        try:
            for job in jobs:
                job_ids.append(self.client.submit(job, tenant=tenant.name, limits=tenant.limits))
        except BaseException:
            self._cancel(job_ids, tenant)
            raise
        return job_ids

    def _cancel(self, job_ids: list[str], tenant: Tenant) -> None:
        for job_id in job_ids:
            try:
                if not self.client.status(job_id).state.terminal:
                    self.client.cancel(job_id)
                    self.client.quotas.release(tenant.name, job_id)
            except ServiceError:
                pass  # it ended meanwhile, or Redis is away: the job's own timeout ends it

    def _result(self, job_id: str) -> JobResult:
        """The job's result, or its failure as the ServiceError its code names."""
        result = self.client.result(job_id)
        if result is not None:
            return result
        status = self.client.status(job_id)
        if status.error is not None:
            raise ServiceError(status.error.message, code=status.error.code)
        raise ServiceError(f"job {job_id} ended {status.state.value}", code=ErrorCode.cancelled)

    async def _ended(self, job_id: str) -> None:
        """Block until the job's record says it ended (woken by its channel)."""
        async with self.fanout.watch(keys.events_channel(job_id)) as wake:
            while True:
                wake.clear()
                state = await self.aio.hget(keys.job(job_id), "state")
                if state is None or JobState(as_text(state)).terminal:
                    return  # ended (or its record is gone: _result says JobNotFound)
                with anyio.move_on_after(KEEPALIVE_S):
                    await wake.wait()

    async def _wait(self, request: Request, job_ids: list[str], tenant: Tenant) -> list[JobResult]:
        """Every choice's result; the client hanging up cancels what has not ended."""
        gone = False
        async with anyio.create_task_group() as group:
            async def watch_disconnect() -> None:
                nonlocal gone
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                gone = True
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            for job_id in job_ids:
                await self._ended(job_id)
            group.cancel_scope.cancel()
        if gone:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self._cancel, job_ids, tenant)
            raise ServiceError("the client went away; its jobs were cancelled", code=ErrorCode.cancelled)
        try:
            return [await run_in_threadpool(self._result, job_id) for job_id in job_ids]
        except ServiceError:
            await run_in_threadpool(self._cancel, job_ids, tenant)
            raise

    def _hold(self, tenant: Tenant, stream_id: str) -> None:
        """The stream's place under the tenant's max_streams (QuotaExceeded past it), renewed while open."""
        self.client.quotas.open_stream(tenant.name, stream_id, tenant.limits, now=time.time(),
                                       lapse_s=3 * KEEPALIVE_S)

    async def _stream(self, job_ids: list[str], tenant: Tenant, chat_id: str, include_usage: bool,
                      stream_id: str) -> AsyncIterator[str]:
        created, model, results = int(time.time()), self.served_model, []

        async def renew() -> None:
            try:
                await run_in_threadpool(self._hold, tenant, stream_id)
            except QuotaExceeded:
                pass  # it lapsed while the process stalled: the stream still ends normally

        try:
            for index, job_id in enumerate(job_ids):
                yield _sse(wire.chunk(chat_id, model, created, index, {"role": "assistant", "content": ""}))
                async with self.fanout.watch(keys.events_channel(job_id)) as wake:
                    async for kind, data, _, _ in job_updates(self.aio, wake, job_id, renew=renew):
                        if kind == "delta":
                            yield _sse(wire.chunk(chat_id, model, created, index, {"content": data["text"]}))
                        elif kind == "keepalive":
                            yield ": keepalive\n\n"
                try:
                    result = await run_in_threadpool(self._result, job_id)
                except ServiceError as exc:
                    yield _sse(wire.error_body(exc.message, wire.status_of(exc.code), exc.code.value))
                    return
                results.append(result)
                yield _sse(wire.chunk(chat_id, model, created, index, {}, result.finish_reason))
            if include_usage:
                yield _sse(wire.usage_chunk(chat_id, model, created, results))
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # a client that hung up cancels this generator
                await run_in_threadpool(self._cancel, job_ids, tenant)
                await run_in_threadpool(self.client.quotas.close_stream, tenant.name, stream_id)

    # ---- routes -----------------------------------------------------------------------
    def mount(self, app: FastAPI) -> None:
        @app.post("/v1/chat/completions", summary="OpenAI Chat Completions (images, video, streaming)",
                  tags=["openai"], openapi_extra={"requestBody": {"required": True, "content": {
                      "application/json": {"schema": {"type": "object", "required": ["model", "messages"]}}}}})
        async def chat_completions(request: Request) -> Any:
            tenant = self.tenant_of(request.headers.get("authorization"))
            raw = await read_capped(request, wire.MAX_BODY_BYTES)
            try:
                body = json.loads(raw)
            except ValueError:
                raise MalformedBody("the body is not JSON") from None
            jobs = await run_in_threadpool(wire.to_jobs, body, self.served_model, self.sink_for(tenant.name))
            chat_id = wire.new_id()
            if body.get("stream"):
                stream_id = uuid.uuid4().hex
                await run_in_threadpool(self._hold, tenant, stream_id)  # 429 past max_streams: nothing submitted
                try:
                    job_ids = await run_in_threadpool(self._submit, jobs, tenant)
                except BaseException:
                    await run_in_threadpool(self.client.quotas.close_stream, tenant.name, stream_id)
                    raise
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(self._stream(job_ids, tenant, chat_id, include_usage, stream_id),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            job_ids = await run_in_threadpool(self._submit, jobs, tenant)
            results = await self._wait(request, job_ids, tenant)
            return JSONResponse(wire.of_results(chat_id, self.served_model, results))

        @app.get("/v1/models", summary="OpenAI Models: the served model", tags=["openai"])
        def models(request: Request) -> dict[str, Any]:
            self.tenant_of(request.headers.get("authorization"))
            return {"object": "list", "data": [self.model_object()]}

        @app.get("/v1/models/{model:path}", summary="OpenAI Models: one model", tags=["openai"])
        def model(model: str, request: Request) -> dict[str, Any]:
            self.tenant_of(request.headers.get("authorization"))
            if model != self.served_model:
                raise wire.OpenAIError(f"The model {model!r} does not exist", status=404, param="model",
                                       code="model_not_found")
            return self.model_object()

