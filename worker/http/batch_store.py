"""Batch files, as in the OpenAI Batch API: one JSONL file of requests, one results file.

Each input line is `{"custom_id": "...", "request": {<JobRequest>}}`. Every line
is checked before any job exists: the lines are streamed into a spool file (so
10,000 lines never sit in memory as objects), and a bad line is reported by its
number. Unless the submit says `partial`, one bad line refuses the whole file.

A batch's jobs are ordinary jobs of its tenant, run at `keys.BATCH_PRIORITY`
(after every interactive job). They wait in the tenant's backlog and reach the
workers in turns with other tenants' (api_client/lanes.py). Their counts by state
come from counters the job transitions keep (api_client/counters.py): a status
call and the finisher's check cost the same for 10 lines and 50,000. When all
have ended, a worker's sweeper writes `batches/{id}/results.jsonl` to the store
(input order: custom_id, job_id, state, output or error, usage, finish_reason) and sends the
batch's one completion callback.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import structlog
from pydantic import ValidationError

from api_client import keys
from api_client.client import JobClient, check_format
from api_client.counters import Counters
from api_client.errors import JobNotFound, RequestRejected
from api_client.lanes import Lanes
from api_client.quotas import Quotas
from api_client.jobstate import NotReplicated, as_text
from api_client.schema import CallbackSpec, JobRequest

log = structlog.get_logger(__name__)

MAX_LINES = 50_000
MAX_CUSTOM_ID = 128
MAX_REPORTED = 100  # bad lines listed in a refusal
CHUNK = 500  # jobs read or written per pipelined round trip
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@dataclass
class Checked:
    """The lines that passed, spooled as `custom_id<TAB>request JSON`, and the ones that did not."""

    spool: IO[str]
    accepted: int = 0
    request_bytes: int = 0  # of the accepted requests' JSON, as they will sit in Redis
    bad: list[dict[str, Any]] = field(default_factory=list)
    bad_count: int = 0


def check_lines(lines: Iterable[bytes | str]) -> Checked:
    checked = Checked(tempfile.TemporaryFile("w+", encoding="utf-8"))
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        problem, custom_id, request = _check(text, seen)
        if problem:
            checked.bad_count += 1
            if len(checked.bad) < MAX_REPORTED:
                checked.bad.append({"line": number, "custom_id": custom_id, "message": problem})
            continue
        if checked.accepted + checked.bad_count >= MAX_LINES:
            raise RequestRejected(f"a batch holds at most {MAX_LINES} lines")
        assert custom_id is not None  # _check names the line's custom_id whenever it passed
        seen.add(custom_id)
        checked.spool.write(f"{custom_id}\t{request}\n")
        checked.accepted += 1
        checked.request_bytes += len(request.encode())
    checked.spool.seek(0)
    return checked


def _check(text: str, seen: set[str]) -> tuple[str, str | None, str]:
    try:
        line = json.loads(text)
    except ValueError:
        return "not JSON", None, ""
    if not isinstance(line, dict) or set(line) != {"custom_id", "request"}:
        return 'each line is {"custom_id": ..., "request": {...}}', None, ""
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID or "\t" in custom_id:
        return f"custom_id must be a string of 1..{MAX_CUSTOM_ID} characters", None, ""
    if custom_id in seen:
        return "custom_id repeats an earlier line", custom_id, ""
    try:
        request = JobRequest.model_validate(line["request"])
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'request'}: {first['msg']}", custom_id, ""
    try:
        check_format(request)
    except RequestRejected as exc:
        return f"response_format: {exc}", custom_id, ""  # "<code>: <message>"
    return "", custom_id, request.model_dump_json(exclude_none=True)


class Batches:
    """Batch records in Redis: create, status, results (the API), and finishing (the sweeper)."""

    def __init__(self, redis_client: redis.Redis, client: JobClient | None = None):
        self.redis = redis_client
        self.client = client  # the API's, to submit the jobs; a worker's sweeper needs none
        self.counters = Counters(redis_client)
        self.lanes = Lanes(redis_client, client.dispatch if client else None)

    @staticmethod
    def new_id() -> str:
        return "batch_" + uuid.uuid4().hex

    def create(self, tenant: str, checked: Checked, *, callback: CallbackSpec | None, batch_id: str = "") -> str:
        """Record the batch and its jobs, each pushed onto the tenant's backlog (admitted beforehand)."""
        batch_id = batch_id or self.new_id()
        k = keys.BatchKeys.of(batch_id)
        self.redis.hset(k.record, mapping={
            "batch_id": batch_id, "tenant": tenant, "state": "submitting", "total": checked.accepted,
            "rejected": checked.bad_count, "created_at": repr(time.time()),
            "callback": callback.model_dump_json() if callback else "",
        })
        self.redis.expire(k.record, keys.JOB_TTL_S)
        if self.client is None:
            raise RuntimeError("Batches.create needs a JobClient")
        rows: list[tuple[str, str, str]] = []
        for row in checked.spool:
            custom_id, request = row.rstrip("\n").split("\t", 1)
            rows.append((custom_id, self.client.jobs.new_job_id(None), request))
            if len(rows) >= CHUNK:
                self._submit(k, tenant, batch_id, rows)
        self._submit(k, tenant, batch_id, rows)
        try:  # acknowledged once these, and so every write before them, are as durable as configured
            self.client.jobs.write_durably(("hset", (k.record, "state", "in_progress")),
                                           ("zadd", (keys.OPEN_BATCHES, {batch_id: time.time()})),
                                           ("expire", (keys.OPEN_BATCHES, keys.JOB_TTL_S)))
        except NotReplicated:
            self.withdraw(batch_id)
            raise
        self.lanes.release_once([tenant])  # the first lane now: KEDA counts the broker's lists, not backlogs
        return batch_id

    def withdraw(self, batch_id: str) -> None:
        """A batch refused after its records were written (no replica confirmed them): its jobs no worker
        started are withdrawn, the batch record and list deleted (its id answers 404). A job a worker had
        already started runs to its end, alone; backlog entries of withdrawn jobs are dropped at release."""
        assert self.client is not None
        k = keys.BatchKeys.of(batch_id)
        try:
            for start in range(0, int(self.redis.llen(k.jobs)), CHUNK):
                for row in self.redis.lrange(k.jobs, start, start + CHUNK - 1):
                    self.client.jobs.withdraw(as_text(row).split("\t")[1])
            self.redis.zrem(keys.OPEN_BATCHES, batch_id)
            self.redis.delete(k.record, k.jobs)
        except redis.RedisError as exc:  # Redis went away: what is left may still run
            log.warning("batch.withdraw_failed", batch_id=batch_id, error=str(exc))

    def _submit(self, k: keys.BatchKeys, tenant: str, batch_id: str, rows: list[tuple[str, str, str]]) -> None:
        """One chunk: its records in one pipelined round trip, its messages in another, then its lines."""
        assert self.client is not None
        if not rows:
            return
        self.client.jobs.create_many([(job_id, request) for _, job_id, request in rows], now=time.time(),
                                     priority=keys.BATCH_PRIORITY, tenant=tenant, batch_id=batch_id)
        self.lanes.push(tenant, [job_id for _, job_id, _ in rows])
        self.redis.rpush(k.jobs, *(f"{custom_id}\t{job_id}" for custom_id, job_id, _ in rows))
        self.redis.expire(k.jobs, keys.JOB_TTL_S)
        rows.clear()

    def record(self, batch_id: str, tenant: str | None = None) -> dict[str, str]:
        """The batch's record; JobNotFound for an unknown batch and for another tenant's alike."""
        raw = self.redis.hgetall(keys.BatchKeys.of(batch_id).record)
        rec = {as_text(k): as_text(v) for k, v in raw.items()}
        if not rec or (tenant is not None and rec.get("tenant") != tenant):
            raise JobNotFound(batch_id)
        return rec

    def status(self, batch_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Two round trips whatever the batch's size: its record, then its counters."""
        rec = self.record(batch_id, tenant)
        counts = json.loads(rec["counts"]) if rec.get("counts") else self.counters.batch(batch_id)
        return {"batch_id": batch_id, "state": rec["state"], "total": int(rec["total"]),
                "rejected_lines": int(rec.get("rejected", 0)), "counts": counts,
                "created_at": float(rec["created_at"]), "completed_at": float(rec["completed_at"])
                if rec.get("completed_at") else None, "results_url": rec.get("results_url") or None}

    def _rows(self, batch_id: str, fields: tuple[str, ...]) -> Iterator[tuple[str, str, list[str]]]:
        """(custom_id, job_id, the job record's `fields`) for every line, in input order."""
        jobs_key = keys.BatchKeys.of(batch_id).jobs
        for start in range(0, int(self.redis.llen(jobs_key)), CHUNK):
            rows = [as_text(r).split("\t") for r in self.redis.lrange(jobs_key, start, start + CHUNK - 1)]
            pipe = self.redis.pipeline(transaction=False)
            for _, job_id in rows:
                pipe.hmget(keys.job(job_id), *fields)
            for (custom_id, job_id), values in zip(rows, pipe.execute(), strict=True):
                yield custom_id, job_id, [v.decode() if v is not None else "" for v in values]

    def redis_text(self, key: str, field: str) -> str:
        return as_text(self.redis.hget(key, field))

    # ---- the sweeper's side ----------------------------------------------
    def finish_ready(self, store: Any, announce: Any) -> list[str]:
        """Write the results of every open batch whose jobs have all ended; returns their ids.

        `announce(batch_id, callback, payload)` sends the completion callback."""
        finished = []
        for raw in self.redis.zrange(keys.OPEN_BATCHES, 0, 100):
            batch_id = as_text(raw)
            k = keys.BatchKeys.of(batch_id)
            state, total = self.redis.hmget(k.record, "state", "total")
            if state is None:  # expired: nothing left to finish
                self.redis.zrem(keys.OPEN_BATCHES, batch_id)
                continue
            if state != b"in_progress" or not self._all_ended(batch_id, int(total or 0)):
                continue
            if not self.redis.set(f"{k.record}:finishing", "1", nx=True, ex=600):
                continue  # another worker is writing it
            finished.append(self._finish(batch_id, store, announce))
        return finished

    def _all_ended(self, batch_id: str, total: int) -> bool:
        counts = self.counters.batch(batch_id)
        return counts["queued"] == counts["running"] == 0 and sum(counts.values()) >= total

    def _finish(self, batch_id: str, store: Any, announce: Any) -> str:
        k = keys.BatchKeys.of(batch_id)
        counts = dict.fromkeys(STATES, 0)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".jsonl") as out:
            for custom_id, job_id, (state, result, code, message) in self._rows(
                    batch_id, ("state", "result", "error_code", "error_message")):
                state = state or "failed"
                counts[state] = counts.get(state, 0) + 1
                done = json.loads(result) if result else None
                out.write(json.dumps({
                    "custom_id": custom_id, "job_id": job_id, "state": state,
                    "output": done["output_text"] if done else None,
                    "error": {"code": code or "expired", "message": message} if state != "succeeded" else None,
                    "usage": done["usage"] if done else None,
                    "finish_reason": done["finish_reason"] if done else None,
                    **({"output_json": done.get("output_json"), "output_complete": done["output_complete"]}
                       if done and done.get("output_complete") is not None else {}),  # a response_format's
                }, ensure_ascii=False, separators=(",", ":")) + "\n")
            out.flush()
            url = store.put_file(f"batches/{batch_id}/results.jsonl", Path(out.name))
        self.redis.hset(k.record, mapping={"state": "completed", "completed_at": repr(time.time()),
                                           "results_url": url, "counts": json.dumps(counts)})
        self.redis.zrem(keys.OPEN_BATCHES, batch_id)
        self.counters.forget_batch(batch_id)
        Quotas(self.redis).drop_batch(self.redis_text(k.record, "tenant"), batch_id)  # its holding goes now
        callback = self.redis.hget(k.record, "callback")
        if callback:
            announce(batch_id, CallbackSpec.model_validate_json(callback), self.status(batch_id))
        log.info("batch.completed", batch_id=batch_id, results_url=url, **counts)
        return batch_id
