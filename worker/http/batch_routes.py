"""The HTTP API's batch routes (worker/http/batch_store.py holds what they do).

    POST /v1/native/batches              a JSONL body (?partial=true&callback_url=...), or
                                         {"input_url": "s3://.../requests.jsonl", "partial": .., "callback": {..}}
    GET  /v1/native/batches/{id}         counts by state; results_url once completed
    GET  /v1/native/batches/{id}/results the results JSONL (409 until completed)

OpenAI's Files and Batches (/v1/files, /v1/batches: openai_files.py, openai_batches.py) run on
the same engine; `mount_openai` adds them.

A refused file answers 422 with `{"error": {...}, "lines": [{"line", "custom_id",
"message"}, ...]}` and creates nothing. A file over the tenant's batch quotas or rate
(api_client/quotas.py `admit_batch`) answers 429 with `Retry-After`, and creates nothing
either: the check runs after the lines are counted and before any record exists, and the
spooled body is deleted.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api_client.client import JobClient
from api_client.errors import Conflict, RequestRejected
from api_client.schema import CallbackSpec
from worker.http.batch_store import Batches, Checked, check_lines
from worker.http.openai_batches import OpenAIBatches, mount_batches
from worker.http.openai_chat import ChatRoutes
from worker.http.openai_files import Files, mount_files
from worker.http.wire import BodyTooLarge, read_capped
from worker.io.media_fetch import parse_s3_url
from worker.io.results_store import ObjectStore


async def _spool(request: Request, limit: int) -> IO[bytes]:
    """The body written to a temporary file as it arrives (memory stays flat), refused past `limit`."""
    spool, size = tempfile.TemporaryFile(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            spool.close()
            raise BodyTooLarge(f"body over {limit} bytes")
        spool.write(chunk)
    spool.seek(0)
    return spool


class BatchRoutes:
    def __init__(self, store: ObjectStore, *, max_body_bytes: int, allowed_buckets: tuple[str, ...] = ()):
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.allowed_buckets = allowed_buckets

    def _input_lines(self, url: str) -> Iterator[bytes]:
        bucket, key = parse_s3_url(url)
        if self.allowed_buckets and bucket not in self.allowed_buckets:
            raise RequestRejected(f"bucket {bucket!r} is not one this service reads")
        body = self.store.fetcher.s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield from body.iter_lines()
        finally:
            body.close()

    def mount(self, app: FastAPI, client: JobClient, tenant_of: Callable[[str | None], Any]) -> None:
        batches = Batches(client.redis, client)

        @app.post("/v1/native/batches", status_code=202, summary="Submit a JSONL file of requests (a batch)")
        async def submit(request: Request, partial: bool = False, callback_url: str | None = None) -> JSONResponse:
            tenant = tenant_of(request.headers.get("authorization"))
            callback = CallbackSpec(url=callback_url) if callback_url else None
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type == "application/json":  # not application/jsonl or x-ndjson: those are the file
                spec = json.loads(await read_capped(request, 64 * 1024))
                if not isinstance(spec, dict) or not isinstance(spec.get("input_url"), str):
                    raise RequestRejected('a JSON body is {"input_url": "s3://...", "partial": ..., "callback": ...}')
                partial = bool(spec.get("partial", partial))
                callback = CallbackSpec.model_validate(spec["callback"]) if spec.get("callback") else callback
                checked: Checked = await run_in_threadpool(lambda: check_lines(self._input_lines(spec["input_url"])))
            else:
                with await _spool(request, self.max_body_bytes) as body:
                    checked = await run_in_threadpool(check_lines, body)
            if checked.bad_count and not partial or not checked.accepted:
                message = (f"{checked.bad_count} bad line(s); nothing was accepted" if checked.bad_count
                           else "the file holds no request")
                checked.spool.close()
                return JSONResponse({"error": {"code": "invalid_request", "message": message},
                                     "lines": checked.bad}, 422)
            batch_id = Batches.new_id()
            try:
                await run_in_threadpool(lambda: client.quotas.admit_batch(
                    tenant.name, batch_id, checked.accepted, checked.request_bytes, tenant.limits, now=time.time()))
            except Exception:
                checked.spool.close()
                raise
            try:
                await run_in_threadpool(lambda: batches.create(tenant.name, checked, callback=callback,
                                                               batch_id=batch_id))
            except BaseException:
                await run_in_threadpool(client.quotas.drop_batch, tenant.name, batch_id)
                raise
            finally:
                checked.spool.close()
            return JSONResponse({"batch_id": batch_id, "accepted": checked.accepted, "rejected": checked.bad}, 202)

        @app.get("/v1/native/batches/{batch_id}", summary="A batch's progress: jobs by state")
        def status(batch_id: str, request: Request) -> dict[str, Any]:
            tenant = tenant_of(request.headers.get("authorization"))
            return batches.status(batch_id, tenant.name)

        @app.get("/v1/native/batches/{batch_id}/results", summary="A completed batch's results (JSONL, input order)")
        def results(batch_id: str, request: Request) -> StreamingResponse:
            tenant = tenant_of(request.headers.get("authorization"))
            rec = batches.record(batch_id, tenant.name)
            if rec["state"] != "completed":
                raise Conflict(f"batch {batch_id} is {rec['state']}: no results yet")
            return StreamingResponse(self.store.iter_lines(f"batches/{batch_id}/results.jsonl"),
                                     media_type="application/jsonl")

    def mount_openai(self, app: FastAPI, client: JobClient, tenant_of: Callable[[str | None], Any],
                     chat: ChatRoutes) -> None:
        """OpenAI's /v1/files and /v1/batches, on the same batch engine and store."""
        files = Files(client.redis, self.store)
        mount_files(app, files, tenant_of, max_bytes=self.max_body_bytes)
        mount_batches(app, OpenAIBatches(client, Batches(client.redis, client), files, chat), tenant_of)
