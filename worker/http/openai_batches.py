"""OpenAI's Batch API on the service's one batch engine (batch_store.py: lanes, quotas, fairness).

    POST /v1/batches               input_file_id, endpoint "/v1/chat/completions", completion_window "24h",
                                   metadata
    GET  /v1/batches               after, limit (1..100, 20): newest first, stable cursor pages
    GET  /v1/batches/{id}          the batch object
    POST /v1/batches/{id}/cancel   cancelling, then cancelled: what ended stays in the files

At creation the input file is checked line by line (validating). A line that is not JSON, lacks
the envelope (custom_id, method POST, url, body), repeats a custom_id, or names another url
than the batch's endpoint fails the whole batch (`failed`, errors.data[].line). A line whose
envelope is valid but whose body is refused (openai_wire.to_jobs, then the job schema) is one
failed request: it goes to the error file with status_code 400, and the rest runs as native
batch jobs (the batch id is the native batch's). When the native batch has completed (the
workers' sweeper wrote its results), the next read of the batch writes the output and error
files in OpenAI's line format (finalizing, then completed, cancelled or expired). A batch not
done within its window is expired: its unfinished jobs are cancelled, what ended is kept.
`callback_url` (an extension, through the SDK's extra_body) gets the native batch's one signed
`batch.completed` callback when its jobs have all ended.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import redis
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api_client import keys
from api_client.client import JobClient
from api_client.errors import JobNotFound, ServiceError
from api_client.jobstate import as_text
from api_client.schema import CallbackSpec, ErrorCode
from worker.http import openai_wire as wire
from worker.http.batch_store import CHUNK, MAX_LINES, Batches, Checked
from worker.http.openai_chat import ChatRoutes
from worker.http.openai_files import DEFAULT_TTL_S, Files, cursor_ids, page, tenant_tag
from worker.http.tenants import Tenant
from worker.http.wire import read_capped

ENDPOINT = "/v1/chat/completions"
WINDOW_S = {"24h": 24 * 3600}
MAX_ERRORS = 100  # listed in a failed batch's errors
FINAL = ("failed", "completed", "expired", "cancelled")


def _line_error(custom_id: str, job_id: str | None, status: int | None, code: str, message: str,
                param: str | None = None) -> dict[str, Any]:
    response = None if status is None else {"status_code": status, "request_id": job_id or "",
                                            "body": wire.error_body(message, status, code, param)}
    return {"id": f"batch_req_{job_id or custom_id}", "custom_id": custom_id, "response": response,
            "error": None if status is not None else {"code": code, "message": message}}


class OpenAIBatches:
    def __init__(self, client: JobClient, batches: Batches, files: Files, chat: ChatRoutes):
        self.client, self.batches, self.files, self.chat = client, batches, files, chat
        self.redis: redis.Redis = client.redis

    def _index(self, tenant: str) -> str:
        return f"{tenant_tag(tenant)}:oai:batches"

    def _key(self, tenant: str, batch_id: str) -> str:
        return f"{tenant_tag(tenant)}:oai:batch:{batch_id}"

    def _save(self, tenant: str, batch_id: str, **fields: Any) -> None:
        self.redis.hset(self._key(tenant, batch_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def _load(self, tenant: str, batch_id: str) -> dict[str, Any]:
        raw = self.redis.hgetall(self._key(tenant, batch_id))
        if not raw:
            raise JobNotFound(f"No such batch: {batch_id}")
        return {as_text(k): json.loads(v) for k, v in raw.items()}

    # ---- create ---------------------------------------------------------------------------
    def create(self, tenant: Tenant, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise wire.OpenAIError("the body must be a JSON object")
        if body.get("endpoint") != ENDPOINT:
            raise wire.OpenAIError(f"endpoint must be {ENDPOINT!r} (the one this service serves)", param="endpoint")
        window = body.get("completion_window")
        if window not in WINDOW_S:
            raise wire.OpenAIError("completion_window must be '24h'", param="completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()):
            raise wire.OpenAIError("metadata: at most 16 string pairs, keys <= 64 and values <= 512 characters",
                                   param="metadata")
        callback = None
        if body.get("callback_url") is not None:  # this service's extension (extra_body): the native batch callback
            try:
                callback = CallbackSpec(url=body["callback_url"])
            except (ValidationError, TypeError):
                raise wire.OpenAIError("callback_url must be an http(s) URL", param="callback_url") from None
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise wire.OpenAIError("input_file_id is required", param="input_file_id")
        if self.files.get(tenant.name, file_id)["purpose"] != "batch":
            raise wire.OpenAIError("the input file's purpose must be 'batch'", param="input_file_id")
        batch_id, now = Batches.new_id(), int(time.time())
        record = {"id": batch_id, "object": "batch", "endpoint": ENDPOINT, "input_file_id": file_id,
                  "completion_window": window, "created_at": now, "expires_at": now + WINDOW_S[window],
                  "metadata": metadata or None, "model": self.chat.served_model, "errors": None}
        checked = Checked(tempfile.TemporaryFile("w+", encoding="utf-8"))
        with checked.spool, tempfile.NamedTemporaryFile("w+", encoding="utf-8", suffix=".jsonl") as refused:
            errors, refused_n = self._check(tenant.name, self.files.lines(tenant.name, file_id), checked, refused)
            total = checked.accepted + refused_n
            if errors or not total:
                errors = errors or [{"code": "empty_file", "line": None, "message": "the input file holds no request",
                                     "param": None}]
                self._record(tenant.name, {**record, "status": "failed", "failed_at": now,
                                           "errors": {"object": "list", "data": errors[:MAX_ERRORS]},
                                           "request_counts": {"total": 0, "completed": 0, "failed": 0}})
                return self.retrieve(tenant.name, batch_id)
            refused.flush()
            if refused_n:
                self.files.store.put_file(self._refused_key(tenant.name, batch_id), Path(refused.name))
            if checked.accepted:
                self.client.quotas.admit_batch(tenant.name, batch_id, checked.accepted, checked.request_bytes,
                                               tenant.limits, now=time.time())  # 429: nothing recorded
                try:
                    self.batches.create(tenant.name, checked, callback=callback, batch_id=batch_id)
                except BaseException:
                    self.client.quotas.drop_batch(tenant.name, batch_id)
                    raise
        self._record(tenant.name, {**record, "status": "in_progress", "in_progress_at": int(time.time()),
                                   "total": total, "refused": refused_n, "native": bool(checked.accepted)})
        return self.retrieve(tenant.name, batch_id)

    def _record(self, tenant: str, fields: dict[str, Any]) -> None:
        self._save(tenant, fields["id"], **fields)
        self.redis.expire(self._key(tenant, fields["id"]), DEFAULT_TTL_S)
        self.redis.zadd(self._index(tenant), {fields["id"]: time.time()})
        self.redis.expire(self._index(tenant), DEFAULT_TTL_S)

    @staticmethod
    def _refused_key(tenant: str, batch_id: str) -> str:
        return f"openai/{tenant}/batches/{batch_id}/refused.jsonl"

    def _check(self, tenant: str, lines: Iterator[bytes], checked: Checked, refused: IO[str]
               ) -> tuple[list[dict[str, Any]], int]:
        """Whole-batch errors (by line), and the count of lines refused one by one (written to `refused`)."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        refused_n = 0
        sink = self.chat.sink_for(tenant)

        def fail(number: int, code: str, message: str, param: str | None = None) -> None:
            errors.append({"code": code, "line": number, "message": message, "param": param})

        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            if number > MAX_LINES:
                fail(number, "too_many_lines", f"a batch holds at most {MAX_LINES} lines")
                break
            try:
                line = json.loads(raw)
            except ValueError:
                fail(number, "invalid_json_line", "the line is not JSON")
                continue
            if not isinstance(line, dict) or not {"custom_id", "method", "url", "body"} <= set(line):
                fail(number, "missing_required_parameter", "each line is {custom_id, method, url, body}")
                continue
            custom_id = line["custom_id"]
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 128 or "\t" in custom_id:
                fail(number, "invalid_custom_id", "custom_id must be a string of 1..128 characters", "custom_id")
                continue
            if custom_id in seen:
                fail(number, "duplicate_custom_id", f"custom_id {custom_id!r} repeats an earlier line", "custom_id")
                continue
            seen.add(custom_id)
            if line["method"] != "POST":
                fail(number, "invalid_method", "method must be POST", "method")
            elif line["url"] != ENDPOINT:
                fail(number, "mismatched_endpoint", f"url must be the batch's endpoint, {ENDPOINT}", "url")
            if errors:
                continue  # the batch fails: read on only to report the other bad lines
            try:
                if isinstance(line["body"], dict) and line["body"].get("stream"):
                    raise wire.OpenAIError("stream is not supported in a batch", param="stream")
                [job] = wire.to_jobs(line["body"], self.chat.served_model, sink, max_n=1)
                request = JobClient._validate(job).model_dump_json(exclude_none=True)
            except ServiceError as exc:
                status = exc.status if isinstance(exc, wire.OpenAIError) else wire.status_of(exc.code)
                code = exc.openai_code if isinstance(exc, wire.OpenAIError) else exc.code.value
                param = exc.param if isinstance(exc, wire.OpenAIError) else None
                refused.write(json.dumps(_line_error(custom_id, None, status, code, exc.message, param)) + "\n")
                refused_n += 1
                continue
            checked.spool.write(f"{custom_id}\t{request}\n")
            checked.accepted += 1
            checked.request_bytes += len(request.encode())
        checked.spool.seek(0)
        return errors, refused_n

    # ---- read -----------------------------------------------------------------------------
    def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any]:
        rec = self._load(tenant, batch_id)
        if rec["status"] in FINAL:
            return self._object(rec)
        native = self._native_state(batch_id) if rec.get("native") else "completed"
        if native == "completed":
            return self._object(self._finalize(tenant, rec))
        now = int(time.time())
        if now >= rec["expires_at"] and not rec.get("cancelling_at") and not rec.get("expiring"):
            self._save(tenant, batch_id, expiring=True)
            self._cancel_jobs(batch_id)
            rec["expiring"] = True
        counts = self.batches.counters.batch(batch_id)
        rec["request_counts"] = {"total": rec["total"], "completed": counts["succeeded"],
                                 "failed": counts["failed"] + counts["cancelled"] + rec["refused"]}
        return self._object(rec)

    def _native_state(self, batch_id: str) -> str:
        try:
            return self.batches.record(batch_id)["state"]
        except JobNotFound:  # its record expired: what the sweeper wrote is what there is
            return "completed"

    def _object(self, rec: dict[str, Any]) -> dict[str, Any]:
        status = rec["status"]
        if status == "in_progress" and rec.get("cancelling_at"):
            status = "cancelling"
        fields = ("id", "object", "endpoint", "errors", "input_file_id", "completion_window", "output_file_id",
                  "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                  "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata", "model",
                  "usage")
        return {**{k: rec.get(k) for k in fields}, "status": status}

    def list(self, tenant: str, after: str | None, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise wire.OpenAIError("limit must be in [1, 100]", param="limit")
        ids, more = cursor_ids(self.redis, self._index(tenant), after, limit)
        items = []
        for batch_id in ids:
            try:
                items.append(self.retrieve(tenant, batch_id))
            except JobNotFound:
                self.redis.zrem(self._index(tenant), batch_id)
        return page(items, more)

    # ---- cancel ---------------------------------------------------------------------------
    def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]:
        rec = self._load(tenant, batch_id)
        if rec["status"] in FINAL:
            raise wire.OpenAIError(f"batch {batch_id} already ended {rec['status']}", status=409,
                                   code=ErrorCode.conflict.value, retry=False)
        if not rec.get("cancelling_at"):
            self._save(tenant, batch_id, cancelling_at=int(time.time()))
            if rec.get("native"):
                self._cancel_jobs(batch_id)
        return self.retrieve(tenant, batch_id)

    def _cancel_jobs(self, batch_id: str) -> None:
        jobs_key = keys.BatchKeys.of(batch_id).jobs
        for start in range(0, int(self.redis.llen(jobs_key)), CHUNK):
            job_ids = [as_text(r).split("\t")[1] for r in self.redis.lrange(jobs_key, start, start + CHUNK - 1)]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "state")
            for job_id, state in zip(job_ids, pipe.execute(), strict=True):
                if state in (b"queued", b"running"):
                    self.client.dispatch.announce(self.client.jobs.cancel(job_id))

    # ---- finalize -------------------------------------------------------------------------
    def _finalize(self, tenant: str, rec: dict[str, Any]) -> dict[str, Any]:
        """Write the output and error files from the native results (once: the others see finalizing)."""
        batch_id = rec["id"]
        if not self.redis.set(f"{self._key(tenant, batch_id)}:finalizing", "1", nx=True, ex=600):
            return {**rec, "status": "finalizing"}
        now = int(time.time())
        self._save(tenant, batch_id, finalizing_at=now)
        ending = "cancelled" if rec.get("cancelling_at") else "expired" if rec.get("expiring") else "completed"
        counts = {"total": rec.get("total", 0), "completed": 0, "failed": 0}
        used = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        store = self.files.store
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".jsonl") as out, \
                tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".jsonl") as err:
            if rec.get("native") and store.exists(f"batches/{batch_id}/results.jsonl"):
                for raw in store.iter_lines(f"batches/{batch_id}/results.jsonl"):
                    row = json.loads(raw)
                    line = self._line(row, ending, rec["created_at"])
                    if line["response"] is not None and line["response"]["status_code"] == 200:
                        counts["completed"] += 1
                        usage = line["response"]["body"]["usage"]
                        used["input_tokens"] += usage["prompt_tokens"]
                        used["output_tokens"] += usage["completion_tokens"]
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    else:
                        counts["failed"] += 1
                        err.write(json.dumps(line, ensure_ascii=False) + "\n")
            if rec.get("refused"):
                for raw in store.iter_lines(self._refused_key(tenant, batch_id)):
                    counts["failed"] += 1
                    err.write(raw.decode())
            out.flush()
            err.flush()
            output = self.files.create(tenant, Path(out.name), filename=f"{batch_id}_output.jsonl",
                                       purpose="batch_output")
            error = self.files.create(tenant, Path(err.name), filename=f"{batch_id}_error.jsonl",
                                      purpose="batch_output") if counts["failed"] else None
        used["total_tokens"] = used["input_tokens"] + used["output_tokens"]
        done = {"status": ending, f"{ending}_at": int(time.time()), "output_file_id": output["id"],
                "error_file_id": error["id"] if error else None, "request_counts": counts,
                "usage": {**used, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}
        self._save(tenant, batch_id, **done)
        return {**rec, "finalizing_at": now, **done}

    def _line(self, row: dict[str, Any], ending: str, created: int) -> dict[str, Any]:
        custom_id, job_id = row["custom_id"], row["job_id"]
        if row["state"] == "succeeded":
            usage = row.get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            body = wire.completion(f"chatcmpl-{job_id}", self.chat.served_model,
                                   [(row["output"], row.get("finish_reason") or "stop")],
                                   wire.usage_of(prompt, completion), created)
            return {"id": f"batch_req_{job_id}", "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": job_id, "body": body}, "error": None}
        error = row.get("error") or {}
        if row["state"] == "cancelled" and ending in ("cancelled", "expired"):
            code = "batch_cancelled" if ending == "cancelled" else "batch_expired"
            return _line_error(custom_id, job_id, None, code, f"the batch was {ending} before this request ran")
        code = error.get("code") or ErrorCode.internal_error.value
        try:
            status = wire.status_of(ErrorCode(code))
        except ValueError:
            status = 500
        return _line_error(custom_id, job_id, status, code, error.get("message") or "failed")


def mount_batches(app: FastAPI, batches: OpenAIBatches, tenant_of: Callable[[str | None], Tenant]) -> None:
    @app.post("/v1/batches", summary="OpenAI Batches: create from an uploaded file", tags=["openai"])
    async def create(request: Request) -> dict[str, Any]:
        tenant = tenant_of(request.headers.get("authorization"))
        try:
            body = json.loads(await read_capped(request, 64 * 1024))
        except ValueError:
            raise wire.OpenAIError("the body is not JSON") from None
        return await run_in_threadpool(batches.create, tenant, body)

    @app.get("/v1/batches", summary="OpenAI Batches: list (newest first, cursor pages)", tags=["openai"])
    def list_batches(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        return batches.list(tenant_of(request.headers.get("authorization")).name, after, limit)

    @app.get("/v1/batches/{batch_id}", summary="OpenAI Batches: one batch", tags=["openai"])
    def retrieve(batch_id: str, request: Request) -> dict[str, Any]:
        return batches.retrieve(tenant_of(request.headers.get("authorization")).name, batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", summary="OpenAI Batches: cancel", tags=["openai"])
    def cancel(batch_id: str, request: Request) -> dict[str, Any]:
        return batches.cancel(tenant_of(request.headers.get("authorization")).name, batch_id)
