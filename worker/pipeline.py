"""The path of one job through a worker, on its task thread.

claim -> fetch media -> decode -> prepare prompt -> the model thread's queue -> wait
-> write result JSON to the store -> final transition (claim holder only)
-> announce the event. Errors rise to one place, `_handle_error`, which asks
worker/errors.py what to do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from api_client.schema import ErrorCode, ImageItem, JobRequest, JobResult, Timings, Usage, VideoItem
from worker.errors import Action, Draining, JobFailed, classify, retry_delay
from worker.jobs import Claim, JobStore
from worker.model_thread import BatchOutcome
from worker.translate import chat_of, sampling_of

log = structlog.get_logger(__name__)

PREVIEW_CHARS = 200
STUCK_GRACE_S = 30.0


@dataclass
class JobContext:
    """Everything the job path needs, built once per worker by WorkerRuntime."""

    settings: Any
    jobs: JobStore
    store: Any  # worker.results_store.ObjectStore
    batcher: Any  # the model thread's queue: worker.steploop.StepLoop or worker.batcher.MicroBatcher
    processor: Any
    model_id: str
    context_length: int | None
    media_limits: Any  # model_runtime.media.MediaLimits
    metrics: Any
    enqueue: Callable[..., None]  # (job_id, priority, countdown=0)
    notify: Callable[[Claim | str, str], None]  # (claim or job_id, event)
    hold: Callable[[Claim], Callable[[], bool]]  # lease renewal starts; returns "was it cancelled?"
    release: Callable[[Claim], None]  # lease renewal stops
    is_draining: Callable[[], bool]
    fetch_https: Callable[[str, int], bytes] | None = None


def process_job(ctx: JobContext, job_id: str) -> str:
    """Run one job end to end; returns what happened (for logs and tests)."""
    outcome, claim = ctx.jobs.claim(job_id)
    if claim is None:
        log.info("job.not_claimed", job_id=job_id, outcome=outcome)
        if outcome in ("expired", "poison"):
            ctx.metrics.job_finished("failed", outcome)
            ctx.notify(job_id, "failed")
        return outcome
    crash_on = getattr(ctx.settings, "crash_on_prompt", None)
    if crash_on is not None and _first_text(claim.request_json) == crash_on:
        log.error("job.crash_injected", job_id=job_id)
        os._exit(137)  # test-only fault injection (IVQ_CRASH_ON_PROMPT): this job kills its worker
    structlog.contextvars.bind_contextvars(job_id=job_id, attempt=claim.attempt)
    try:
        if ctx.is_draining():
            raise Draining()
        cancelled = ctx.hold(claim)
        ctx.notify(claim, "running")
        with ctx.metrics.track_in_flight():
            return _run(ctx, claim, cancelled)
    except Exception as exc:  # noqa: BLE001 - the one place errors are decided
        return _handle_error(ctx, claim, exc)
    finally:
        ctx.release(claim)
        structlog.contextvars.unbind_contextvars("job_id", "attempt")


def _run(ctx: JobContext, claim: Claim, cancelled: Callable[[], bool]) -> str:
    from model_runtime.prompts import prepare  # the model stack loads only in workers

    started = time.time()
    deadline = time.monotonic() + ctx.settings.job_timeout_s
    queued_s = max(0.0, started - claim.queued_at)
    ctx.metrics.observe_job(queue_wait_s=queued_s)
    ctx.batcher.announce()
    try:
        request = JobRequest.model_validate_json(claim.request_json)
        media = {item.url: _decode(ctx, item) for item in request.media_items()}
        prepared = prepare(
            ctx.processor, chat_of(request), media, sampling_of(request.generation), request_id=claim.job_id,
            max_tiles=ctx.settings.max_tiles, context_length=ctx.context_length,
        )
    except BaseException:
        ctx.batcher.withdraw()
        raise
    preprocess_s = time.time() - started
    ctx.metrics.observe_job(preprocess_s=preprocess_s)
    # The engine checks both at every step: a cancelled job stops using the GPU, a late one ends at its deadline.
    prepared.cancelled, prepared.deadline = cancelled, deadline
    future = ctx.batcher.submit(prepared, announced=True)
    # A failure of this request alone (model_runtime.types) is raised here and classified like any other.
    # The wait's own timeout only guards against a model thread that stopped stepping.
    done: BatchOutcome = future.result(timeout=max(0.0, deadline - time.monotonic()) + STUCK_GRACE_S)
    ctx.metrics.observe_job(batch_wait_s=done.batch_wait_s)
    out = done.output
    result = JobResult(
        job_id=claim.job_id, output_text=out.text, finish_reason=out.finish_reason,
        usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    image_tiles=prepared.image_tiles, video_frames=prepared.video_frames),
        timings=Timings(queued_ms=queued_s * 1000, preprocess_ms=preprocess_s * 1000,
                        batch_wait_ms=done.batch_wait_s * 1000, generate_ms=out.generate_ms,
                        total_ms=(time.time() - claim.queued_at) * 1000),
        batch_size=done.batch_size, batch_id=done.batch_id, model=ctx.model_id,
        worker_id=ctx.jobs.worker_id, attempt=claim.attempt, metadata=request.metadata,
    )
    body = result.model_dump(mode="json")
    if not ctx.jobs.holds(claim):  # cancelled or taken over while it ran: write nothing to the store
        log.warning("job.result_discarded", reason="claim lost before the result was written")
        return "discarded"
    key = f"results/{claim.job_id}.json"
    url = ctx.store.put_json(key, body)
    ok = ctx.jobs.succeed(claim, {
        "result": result.model_dump_json(), "output_preview": out.text[:PREVIEW_CHARS],
        "batch_size": str(done.batch_size), "result_url": url,
    })
    if not ok:
        # Cancelled between the check above and the write: take the object back. (If it
        # was taken over instead, the new holder writes the same key; leave it.)
        if ctx.jobs.state(claim.job_id) == "cancelled":
            ctx.store.delete(key)
        log.warning("job.result_discarded", reason="claim lost (cancelled or taken over)")
        return "discarded"
    ctx.metrics.job_finished("succeeded", "")
    log.info("job.succeeded", batch_id=done.batch_id, batch_size=done.batch_size,
             completion_tokens=out.completion_tokens)
    ctx.notify(claim, "succeeded")
    return "succeeded"


def _first_text(request_json: str) -> str | None:
    for message in json.loads(request_json).get("messages", []):
        for item in message.get("content", []):
            if item.get("type") == "text":
                return item.get("text")
    return None


def _decode(ctx: JobContext, item: ImageItem | VideoItem) -> Any:
    from model_runtime.media import decode_image, decode_video

    limits = ctx.media_limits
    max_bytes = limits.max_image_bytes if isinstance(item, ImageItem) else limits.max_video_bytes
    if item.url.startswith(("https://", "http://")):
        if ctx.fetch_https is None:
            raise JobFailed(ErrorCode.forbidden_url, "http(s) media is disabled on this service; use s3://")
        data = ctx.fetch_https(item.url, max_bytes)
    else:
        data = ctx.store.get_bytes(item.url, max_bytes=max_bytes)
    if isinstance(item, ImageItem):
        return decode_image(data, limits)
    return decode_video(data, limits, item.num_frames)


def _handle_error(ctx: JobContext, claim: Claim, exc: BaseException) -> str:
    c = classify(exc)
    settings = ctx.settings
    if c.action is Action.REQUEUE:
        if ctx.jobs.requeue(claim, "draining", count_attempt=False):
            ctx.enqueue(claim.job_id, claim.priority)
        log.info("job.handed_back", reason=c.message)
        return "handed_back"
    if c.action is Action.RETRY and claim.attempt < settings.max_attempts:
        delay = retry_delay(claim.attempt, base_s=1.0, cap_s=60.0)
        if ctx.jobs.requeue(claim, c.code.value, count_attempt=True):
            ctx.metrics.job_retried(c.code.value)
            ctx.enqueue(claim.job_id, claim.priority, countdown=delay)
        log.warning("job.retry", code=c.code.value, error=c.message, delay_s=round(delay, 2))
        return "retry"
    if c.code is ErrorCode.cancelled:  # the claim is gone (cancelled or taken over): nothing left to write
        log.info("job.stopped", reason=c.message)
        return "cancelled"
    message = c.message if c.action is Action.FAIL else f"gave up after {claim.attempt} attempts: {c.message}"
    if c.code is ErrorCode.internal_error:
        log.exception("job.internal_error", exc_info=exc)
    if ctx.jobs.fail(claim, c.code.value, message):
        ctx.metrics.job_finished("failed", c.code.value)
        ctx.notify(claim, "failed")
    log.info("job.failed", code=c.code.value, error=message)
    return "failed"
