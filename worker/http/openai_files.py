"""OpenAI's Files, for the Batch API: the content in the object store, its record in Redis.

    POST   /v1/files               multipart: file, purpose ("batch"), expires_after[seconds]
    GET    /v1/files               after, limit, order, purpose: a cursor page
    GET    /v1/files/{id}          the file object
    GET    /v1/files/{id}/content  the bytes
    DELETE /v1/files/{id}

A file belongs to its tenant: its content is `openai/{tenant}/files/{id}` in the store, its
record and the tenant's index (a sorted set, by creation) sit under the tenant's Redis hash
tag. Another tenant's id is not found, exactly like an unknown one. Batch output and error
files (purpose `batch_output`) are created here too (openai_batches.py). Records live
`expires_after` seconds (30 days by default); the objects are left to the bucket's lifecycle
rules once their records are gone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api_client import keys
from api_client.errors import JobNotFound
from api_client.jobstate import as_text
from worker.http.openai_wire import OpenAIError
from worker.http.tenants import Tenant
from worker.http.wire import BodyTooLarge
from worker.io.results_store import ObjectStore

DEFAULT_TTL_S = 30 * 24 * 3600
PURPOSES = ("batch", "batch_output")


def tenant_tag(tenant: str) -> str:
    return f"{{{keys.PREFIX}:tenant:{tenant}}}"


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def cursor_ids(r: redis.Redis, index: str, after: str | None, limit: int, newest_first: bool = True
               ) -> tuple[list[str], bool]:
    """Ids after `after` in the index's stable order (creation time, then id), and whether more follow."""
    if not 1 <= limit <= 10_000:
        raise OpenAIError("limit must be in [1, 10000]", param="limit")
    start = 0
    if after:
        rank = r.zrevrank(index, after) if newest_first else r.zrank(index, after)
        if rank is None:
            return [], False
        start = int(rank) + 1  # type: ignore[arg-type]
    read = r.zrevrange if newest_first else r.zrange
    ids = [as_text(x) for x in read(index, start, start + limit)]
    return ids[:limit], len(ids) > limit


class Files:
    def __init__(self, r: redis.Redis, store: ObjectStore):
        self.redis, self.store = r, store

    def _index(self, tenant: str) -> str:
        return f"{tenant_tag(tenant)}:oai:files"

    def _record(self, tenant: str, file_id: str) -> str:
        return f"{tenant_tag(tenant)}:oai:file:{file_id}"

    @staticmethod
    def content_key(tenant: str, file_id: str) -> str:
        return f"openai/{tenant}/files/{file_id}"

    def create(self, tenant: str, path: Path, *, filename: str, purpose: str, ttl_s: int = DEFAULT_TTL_S
               ) -> dict[str, Any]:
        file_id = "file-" + uuid.uuid4().hex
        now = int(time.time())
        self.store.put_file(self.content_key(tenant, file_id), path)
        obj = {"id": file_id, "object": "file", "bytes": path.stat().st_size, "created_at": now,
               "filename": filename, "purpose": purpose, "status": "processed", "expires_at": now + ttl_s,
               "status_details": None}
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._record(tenant, file_id), json.dumps(obj), ex=ttl_s)
        pipe.zadd(self._index(tenant), {file_id: time.time()})
        pipe.expire(self._index(tenant), DEFAULT_TTL_S)
        pipe.execute()
        return obj

    def get(self, tenant: str, file_id: str) -> dict[str, Any]:
        raw = self.redis.get(self._record(tenant, file_id))
        if raw is None:
            raise JobNotFound(f"No such file: {file_id}")
        return dict(json.loads(raw))

    def list(self, tenant: str, after: str | None, limit: int, order: str, purpose: str | None) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise OpenAIError("order is asc or desc", param="order")
        items: list[dict[str, Any]] = []
        more = True
        while more and len(items) < limit:  # the purpose filter may skip some: read on
            ids, more = cursor_ids(self.redis, self._index(tenant), after, limit, newest_first=order == "desc")
            if not ids:
                break
            raws = self.redis.mget([self._record(tenant, i) for i in ids])
            for file_id, raw in zip(ids, raws, strict=True):
                if raw is None:
                    self.redis.zrem(self._index(tenant), file_id)  # its record expired
                    continue
                obj = json.loads(raw)
                if purpose is None or obj["purpose"] == purpose:
                    items.append(obj)
            after = ids[-1]
        return page(items[:limit], more or len(items) > limit)

    def lines(self, tenant: str, file_id: str) -> Iterator[bytes]:
        self.get(tenant, file_id)
        return self.store.iter_lines(self.content_key(tenant, file_id))

    def delete(self, tenant: str, file_id: str) -> dict[str, Any]:
        self.get(tenant, file_id)
        self.store.delete(self.content_key(tenant, file_id))
        self.redis.delete(self._record(tenant, file_id))
        self.redis.zrem(self._index(tenant), file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def mount_files(app: FastAPI, files: Files, tenant_of: Callable[[str | None], Tenant], *, max_bytes: int) -> None:
    @app.post("/v1/files", summary="OpenAI Files: upload a batch input (multipart: file, purpose)",
              tags=["openai"], openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                  "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
                      "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]},
                      "expires_after[seconds]": {"type": "integer"}}}}}}})
    async def upload(request: Request) -> dict[str, Any]:
        tenant = tenant_of(request.headers.get("authorization"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
            raise BodyTooLarge(f"a file holds at most {max_bytes} bytes")
        async with request.form(max_files=1, max_fields=8) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if purpose not in ("batch",):
                raise OpenAIError("purpose must be 'batch' (the only use of files here)", param="purpose")
            if upload is None or isinstance(upload, str):
                raise OpenAIError("a multipart 'file' part is required", param="file")
            ttl_s = DEFAULT_TTL_S
            seconds = form.get("expires_after[seconds]")
            if isinstance(seconds, str):
                if not seconds.isdigit() or not 3600 <= int(seconds) <= DEFAULT_TTL_S:
                    raise OpenAIError(f"expires_after[seconds] must be in [3600, {DEFAULT_TTL_S}]",
                                      param="expires_after")
                ttl_s = int(seconds)

            def keep() -> dict[str, Any]:
                with tempfile.NamedTemporaryFile(suffix=".jsonl") as spool:
                    upload.file.seek(0)
                    shutil.copyfileobj(upload.file, spool)
                    spool.flush()
                    if spool.tell() > max_bytes:
                        raise BodyTooLarge(f"a file holds at most {max_bytes} bytes")
                    return files.create(tenant.name, Path(spool.name), filename=upload.filename or "upload.jsonl",
                                        purpose="batch", ttl_s=ttl_s)
            return await run_in_threadpool(keep)

    @app.get("/v1/files", summary="OpenAI Files: list (cursor pages)", tags=["openai"])
    def list_files(request: Request, after: str | None = None, limit: int = 100, order: str = "desc",
                   purpose: str | None = None) -> dict[str, Any]:
        tenant = tenant_of(request.headers.get("authorization"))
        return files.list(tenant.name, after, limit, order, purpose)

    @app.get("/v1/files/{file_id}", summary="OpenAI Files: one file", tags=["openai"])
    def retrieve(file_id: str, request: Request) -> dict[str, Any]:
        return files.get(tenant_of(request.headers.get("authorization")).name, file_id)

    @app.get("/v1/files/{file_id}/content", summary="OpenAI Files: the content", tags=["openai"])
    def content(file_id: str, request: Request) -> StreamingResponse:
        lines = files.lines(tenant_of(request.headers.get("authorization")).name, file_id)
        return StreamingResponse(lines, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", summary="OpenAI Files: delete", tags=["openai"])
    def delete(file_id: str, request: Request) -> dict[str, Any]:
        return files.delete(tenant_of(request.headers.get("authorization")).name, file_id)
