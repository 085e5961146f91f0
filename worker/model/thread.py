"""The worker's one model thread: the engine, the queue in front of it, and what each job gets back.

`IVQ_ENGINE=continuous` (the default): a `ContinuousEngine` driven by a
`StepLoop`; requests join and leave the running batch at every decode step.
`IVQ_ENGINE=static`: the one-generate-per-batch `Engine` behind the
`MicroBatcher`, kept so the benchmark compares the two side by side.
Both queues have the same task-thread side (announce, withdraw, submit,
pending, stop), and both futures resolve to a `BatchOutcome` or raise the
request's own error.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from worker.model.batcher import BatchInfo, MicroBatcher
from worker.ops.metrics import Metrics
from worker.settings import Settings
from worker.model.steploop import RunInfo, StepLoop

if TYPE_CHECKING:  # the model stack loads only in a worker that serves "infer"
    from model_runtime.engine import Engine
    from model_runtime.engine_continuous import ContinuousEngine
    from model_runtime.loading import Loaded
    from model_runtime.types import Output, Prepared

log = structlog.get_logger(__name__)


@dataclass
class BatchOutcome:
    """What the model thread hands back to one task thread."""

    output: Output
    batch_id: str  # static: the generate call; continuous: the engine's busy period
    batch_size: int  # static: the batch; continuous: the largest running batch it decoded in
    batch_wait_s: float  # submit → its batch started (static) or it was admitted (continuous)


@dataclass
class ModelThread:
    engine: ContinuousEngine | Engine
    queue: StepLoop | MicroBatcher

    def stop(self, timeout: float) -> None:
        self.queue.stop(drain=False, timeout=timeout)


def start_model_thread(loaded: Loaded, settings: Settings, *, metrics: Metrics, worker_id: str,
                       on_loop: Callable[[], None]) -> ModelThread:
    if settings.engine == "static":
        return _start_static(loaded, settings, metrics=metrics, worker_id=worker_id, on_loop=on_loop)
    return _start_continuous(loaded, settings, metrics=metrics, worker_id=worker_id, on_loop=on_loop)


def _start_continuous(loaded: Loaded, s: Settings, *, metrics: Metrics, worker_id: str,
                      on_loop: Callable[[], None]) -> ModelThread:
    from model_runtime.capacity import kv_budget_tokens, kv_bytes_per_token
    from model_runtime.engine_continuous import ContinuousEngine
    from model_runtime.vision_cache import VisionCache, ensure_keys

    # Warm-up runs under the configured budget, or an unbounded one when it is read from memory afterwards,
    # and without the vision cache: its copies of one image must all run the tower, at the largest batch.
    engine = ContinuousEngine(loaded, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens or 2**40,
                              prefill_chunk_tokens=s.prefill_chunk_tokens, vision_chunk_tiles=s.vision_chunk_tiles,
                              progress_interval_s=s.progress_interval_s, vision_cache_mb=0)
    if s.warmup:
        engine.warmup(s.max_batch_size)
    engine.vision_cache = VisionCache.of_mb(s.vision_cache_mb)
    engine.max_batch_tokens = kv_budget_tokens(loaded.model, device=loaded.device, setting=s.max_batch_tokens)
    if s.max_batch_tokens is None and loaded.device.startswith("cuda"):  # the cache will hold this much of it
        engine.max_batch_tokens = max(1, engine.max_batch_tokens
                                      - engine.vision_cache.capacity_bytes // kv_bytes_per_token(loaded.model))
    metrics.watch_vision_cache(engine.vision_cache.snapshot)
    log.info("kv_budget", max_batch_tokens=engine.max_batch_tokens, source="setting" if s.max_batch_tokens else
             ("free memory" if loaded.device.startswith("cuda") else "cpu default"),
             vision_cache_mb=s.vision_cache_mb)

    def outcome(prepared: Prepared, output: Output, info: RunInfo) -> BatchOutcome:
        batch_id = f"{worker_id}:run{info.run}"
        metrics.observe_batch(output.batch_size, prepared.cost, output.generate_ms / 1000.0, output.completion_tokens)
        log.info("generate.done", job_id=prepared.request_id, batch_id=batch_id, batch_size=output.batch_size,
                 completion_tokens=output.completion_tokens, finish_reason=output.finish_reason,
                 wait_ms=round(output.wait_ms, 1), generate_ms=round(output.generate_ms, 1))
        return BatchOutcome(output, batch_id, output.batch_size, output.wait_ms / 1000.0)

    # Tile digests not on the model thread: set in preparation (worker/jobs/inputs.py), else here at submit.
    before = ensure_keys if engine.vision_cache.enabled else None
    loop = StepLoop(engine, on_loop=on_loop, wrap=outcome, before_submit=before, name="model-thread")
    return ModelThread(engine, loop.start())


def _start_static(loaded: Loaded, s: Settings, *, metrics: Metrics, worker_id: str,
                  on_loop: Callable[[], None]) -> ModelThread:
    from model_runtime.engine import Engine

    engine = Engine(loaded, max_batch_size=s.max_batch_size)
    if s.warmup:
        engine.warmup(s.max_batch_size)
    sequence = itertools.count(1)

    def run_batch(items: list[Prepared], info: BatchInfo) -> list[BatchOutcome | BaseException]:
        batch_id = f"{worker_id}:{next(sequence)}"
        structlog.contextvars.bind_contextvars(batch_id=batch_id)
        started = time.perf_counter()
        outputs = engine.generate_batch(items)
        generate_s = time.perf_counter() - started
        tokens = sum(o.completion_tokens for o in outputs if not isinstance(o, BaseException))
        metrics.observe_batch(info.size, info.cost, generate_s, tokens)
        log.info("batch.done", size=info.size, cost=info.cost, generate_s=round(generate_s, 4), tokens=tokens)
        structlog.contextvars.unbind_contextvars("batch_id")
        # A request's own failure stays an exception: the batcher raises it through that request's future.
        return [o if isinstance(o, BaseException) else BatchOutcome(o, batch_id, info.size, waited)
                for o, waited in zip(outputs, info.waited_s, strict=True)]

    queue = MicroBatcher(
        run_batch, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms, max_batch_cost=s.max_batch_cost,
        cost=lambda p: p.cost, group_key=lambda p: p.sampling, on_loop=on_loop, name="model-thread",
        similar_cost=True,  # like-sized prompts batch together: less padding (benchmarks/BENCHMARKS.md)
        rank=lambda p: int(p.batch_class),  # interactive jobs before a batch file's
    ).start()
    return ModelThread(engine, queue)
