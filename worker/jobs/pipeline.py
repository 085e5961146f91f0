"""The path of one job through a worker, on its task thread.

claim (api_client/jobstate.py) → the job's inputs: fetch, decode and the processor
(worker/jobs/inputs.py), in a preprocessing process (worker/jobs/prep_pool.py)
or on this thread → the model thread's queue → wait on its future → write the
result JSON (worker/io/results_store.py) → succeed (claim holder only) →
announce the event (api_client/dispatch.py).

Every error rises to one place, `_handle_error`, which asks worker/jobs/errors.py
what happens next. `JobContext` holds what the path needs; WorkerRuntime
builds it once, when the model is loaded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from api_client.dispatch import Dispatcher
from api_client.formats import CompiledFormat, FormatRejected, compile_format
from api_client.jobstate import Claim, JobStore
from api_client.schema import ErrorCode, JobRequest, JobResult, Timings, Usage
from worker.jobs.errors import Action, Classified, Draining, JobFailed, backoff_delay, classify
from worker.jobs.held import HeldClaims
from worker.model.thread import BatchOutcome
from worker.ops.metrics import Metrics
from worker.jobs.progress import ProgressPublisher
from worker.settings import Settings
from worker.io.media_fetch import MediaFetcher
from worker.io.results_store import ObjectStore

if TYPE_CHECKING:
    from model_runtime.loading import Loaded
    from model_runtime.media import MediaLimits
    from model_runtime.types import Prepared

log = structlog.get_logger(__name__)

PREVIEW_CHARS = 200
STUCK_GRACE_S = 30.0
RETRY_BASE_S, RETRY_CAP_S = 1.0, 60.0


class ModelQueue(Protocol):
    """The task-thread side of the model thread's queue (worker/model/steploop.py, worker/model/batcher.py)."""

    def announce(self) -> None: ...
    def withdraw(self) -> None: ...
    def submit(self, item: Prepared, *, announced: bool = False) -> Future[BatchOutcome]: ...


class Inputs(Protocol):
    """Where a job's inputs are prepared: worker/jobs/prep_pool.py `PrepPool`, or `InThreadInputs` below."""

    def prepare(self, job_id: str, request_json: str, request: JobRequest, *, deadline: float) -> Prepared: ...


@dataclass(frozen=True)
class JobContext:
    """Everything the job path needs, built once per worker by WorkerRuntime."""

    settings: Settings
    jobs: JobStore
    held: HeldClaims
    dispatch: Dispatcher
    media: MediaFetcher  # reads media under limits
    results: ObjectStore  # where result JSON goes
    queue: ModelQueue
    loaded: Loaded
    media_limits: MediaLimits
    metrics: Metrics
    is_draining: Callable[[], bool]
    inputs: Inputs
    progress: ProgressPublisher | None = None  # None: no live progress (off, or the static engine)


def process_job(ctx: JobContext, job_id: str) -> str:
    """Run one job end to end; returns what happened (for logs and tests)."""
    claimed = ctx.jobs.claim(job_id)
    ctx.dispatch.announce(claimed)
    claim = claimed.claim
    if claim is None:
        log.info("job.not_claimed", job_id=job_id, outcome=claimed.outcome)
        if claimed.state == "failed":  # expired or poison, ended by the claim itself
            ctx.metrics.job_finished("failed", claimed.outcome)
        return claimed.outcome
    structlog.contextvars.bind_contextvars(job_id=job_id, attempt=claim.attempt)
    try:
        if ctx.is_draining():
            raise Draining()
        lost = ctx.held.hold(claim)
        with ctx.metrics.track_in_flight():
            return _run(ctx, claim, lost)
    except Exception as exc:  # noqa: BLE001 - the one place errors are decided
        return _handle_error(ctx, claim, exc)
    finally:
        ctx.held.release(claim)
        structlog.contextvars.unbind_contextvars("job_id", "attempt")


def _run(ctx: JobContext, claim: Claim, lost: Callable[[], bool]) -> str:
    started = time.time()
    deadline = time.monotonic() + ctx.settings.job_timeout_s
    queued_s = max(0.0, started - claim.queued_at)
    ctx.metrics.observe_job(queue_wait_s=queued_s)
    ctx.queue.announce()
    try:
        request = JobRequest.model_validate_json(claim.request_json)
        compiled = _format_of(request)
        prepared = ctx.inputs.prepare(claim.job_id, claim.request_json, request, deadline=deadline)
        if compiled is not None:  # compiled here (or found in the model's cache), off the model thread
            prepared.constraint = ctx.loaded.grammars.constraint(compiled.grammar)
    except BaseException:
        ctx.queue.withdraw()
        raise
    preprocess_s = time.time() - started
    ctx.metrics.observe_job(preprocess_s=preprocess_s)
    # The engine checks both at every step: a cancelled job stops using the GPU, a late one ends at its deadline.
    prepared.cancelled, prepared.deadline = lost, deadline
    prepared.priority = claim.priority  # the engine admits interactive jobs before batch ones (BATCH_PRIORITY)
    if ctx.progress is not None:  # the engine hands this job's ids so far to the publisher thread
        prepared.on_progress = ctx.progress.hook(claim, prepared.sampling.stop)
    future = ctx.queue.submit(prepared, announced=True)
    # A failure of this request alone (model_runtime.types) is raised here and classified like any other.
    # The wait's own timeout only guards against a model thread that stopped stepping.
    done = future.result(timeout=max(0.0, deadline - time.monotonic()) + STUCK_GRACE_S)
    ctx.metrics.observe_job(batch_wait_s=done.batch_wait_s)
    out = done.output
    result = JobResult(
        job_id=claim.job_id, output_text=out.text, finish_reason=out.finish_reason,
        usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    image_tiles=prepared.image_tiles, video_frames=prepared.video_frames),
        timings=Timings(queued_ms=queued_s * 1000, preprocess_ms=preprocess_s * 1000,
                        batch_wait_ms=done.batch_wait_s * 1000, generate_ms=out.generate_ms,
                        total_ms=(time.time() - claim.queued_at) * 1000),
        batch_size=done.batch_size, batch_id=done.batch_id, model=ctx.loaded.model_id,
        worker_id=ctx.jobs.worker_id, attempt=claim.attempt, metadata=request.metadata,
        **_structured_fields(compiled, out.text, out.grammar_complete),
    )
    if not ctx.jobs.holds(claim):  # cancelled or taken over while it ran: write nothing to the store
        log.warning("job.result_discarded", reason="claim lost before the result was written")
        return "discarded"
    key = f"results/{claim.tenant}/{claim.job_id}.json"
    url = ctx.results.put_json(key, result.model_dump(mode="json"))
    ended = ctx.jobs.succeed(claim, {
        "result": result.model_dump_json(), "output_preview": out.text[:PREVIEW_CHARS],
        "batch_size": str(done.batch_size), "result_url": url,
    })
    if not ended.done:
        # Cancelled between the check above and the write: take the object back. (If it
        # was taken over instead, the new holder writes the same key; leave it.)
        if ended.state == "cancelled":
            ctx.results.delete(key)
        log.warning("job.result_discarded", reason="claim lost (cancelled or taken over)")
        return "discarded"
    ctx.metrics.job_finished("succeeded", "")
    log.info("job.succeeded", batch_id=done.batch_id, batch_size=done.batch_size,
             completion_tokens=out.completion_tokens)
    ctx.dispatch.announce(ended)
    return "succeeded"


def _format_of(request: JobRequest) -> CompiledFormat | None:
    """The request's response_format as a grammar; checked at submit, and again here."""
    try:
        return compile_format(request.response_format)
    except FormatRejected as exc:
        raise JobFailed(exc.message, code=ErrorCode(exc.code)) from None


def _structured_fields(compiled: CompiledFormat | None, text: str, complete: bool | None) -> dict[str, Any]:
    """output_complete (and output_json for JSON) of a job with a response_format; nothing for free text."""
    if compiled is None:
        return {}
    if not compiled.is_json or not complete:
        return {"output_complete": bool(complete)}
    try:
        return {"output_complete": True, "output_json": json.loads(text)}
    except ValueError:  # the grammar said complete; never pass off what does not parse
        log.error("structured_output_unparsable", chars=len(text))
        return {"output_complete": False}


def _handle_error(ctx: JobContext, claim: Claim, exc: BaseException) -> str:
    c = classify(exc)
    if c.code is ErrorCode.preprocess_crashed and ctx.is_draining():
        # The worker is stopping: a preprocessing process that died now most likely got the
        # stop's signal too (sent to the process group, or the whole cgroup): not the job's fault.
        c = Classified(Action.REQUEUE, c.code, f"{c.message}, while the worker drained")
    if c.action is Action.REQUEUE:
        if ctx.jobs.requeue(claim, "draining", count_attempt=False):
            ctx.dispatch.run_job(claim.job_id, claim.priority)
        log.info("job.handed_back", reason=c.message)
        return "handed_back"
    if c.action is Action.RETRY and claim.attempt < ctx.settings.max_attempts:
        delay = backoff_delay(claim.attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S)
        if ctx.jobs.requeue(claim, c.code.value, count_attempt=True):
            ctx.metrics.job_retried(c.code.value)
            ctx.dispatch.run_job(claim.job_id, claim.priority, countdown=delay)
        log.warning("job.retry", code=c.code.value, error=c.message, delay_s=round(delay, 2))
        return "retry"
    if c.action is Action.STOP:  # the claim is gone (cancelled or taken over): nothing left to write
        log.info("job.stopped", reason=c.message)
        return "cancelled"
    message = c.message if c.action is Action.FAIL else f"gave up after {claim.attempt} attempts: {c.message}"
    if c.code is ErrorCode.internal_error:
        log.exception("job.internal_error", exc_info=exc)
    ended = ctx.jobs.fail(claim, c.code.value, message)
    if ended.done:
        ctx.metrics.job_finished("failed", c.code.value)
        ctx.dispatch.announce(ended)
    log.info("job.failed", code=c.code.value, error=message)
    return "failed"
