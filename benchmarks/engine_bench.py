"""The bare engines, side by side on the same prepared jobs: one `generate` per job, static, continuous.

- sequential: the static `Engine.generate_batch([item])`, one job after the other;
- static: `Engine.generate_batch` behind the real MicroBatcher the worker uses
  with IVQ_ENGINE=static (cost-aware batch forming, batches split by decoding
  settings), fed the way the task threads feed it: every job is announced
  first (the task threads announce when they start preparing), then
  submitted, so batches form as they would at saturation;
- continuous: `ContinuousEngine` behind the real StepLoop the worker uses by
  default, every job submitted at once, each future awaited.

Preprocessing is done before the clock starts; what is timed is the model
thread alone. Each run gets an engine of its own (the same loaded weights),
so its counters are its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from worker.model.batcher import MicroBatcher
from worker.model.steploop import StepLoop


@dataclass(frozen=True)
class ContinuousKnobs:
    """The continuous engine's settings other than its cap (the worker's, from its Settings)."""

    max_batch_tokens: int
    prefill_chunk_tokens: int
    vision_chunk_tiles: int

    @classmethod
    def of(cls, loaded: Any, settings: Any) -> ContinuousKnobs:
        """What worker/model/thread.py gives its engine: the KV budget as the worker resolves it
        (the setting, else free CUDA memory, else the CPU default) and the chunk sizes."""
        from model_runtime.capacity import kv_budget_tokens

        return cls(kv_budget_tokens(loaded.model, device=loaded.device, setting=settings.max_batch_tokens),
                   settings.prefill_chunk_tokens, settings.vision_chunk_tiles)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class EngineRun:
    """One timed pass over a list of jobs (any engine)."""

    jobs: int
    seconds: float
    tokens: int  # sum of completion_tokens
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # per job, in order
    batches: int = 0  # static: generate calls
    padded_tokens: int = 0
    total_tokens: int = 0
    generate_seconds: float = 0.0
    decode_batch: float | None = None  # continuous: mean running-batch size over decode steps
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_fraction(self) -> float:
        return self.padded_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def mean_batch(self) -> float:
        if self.decode_batch is not None:
            return self.decode_batch
        return self.jobs / self.batches if self.batches else 0.0

    def same_tokens(self, other: EngineRun) -> float:
        """Share of jobs whose generated ids equal `other`'s (greedy: 1.0 whatever the batching)."""
        pairs = list(zip(self.token_ids, other.token_ids, strict=True))
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobs": self.jobs, "seconds": round(self.seconds, 4), "jobs_per_s": round(self.jobs_per_s, 4),
            "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 2), "mean_batch": round(self.mean_batch, 2),
            "generate_seconds": round(self.generate_seconds, 4),
        }
        if self.decode_batch is None:
            out.update(batches=self.batches, padding_fraction=round(self.padding_fraction, 4))
        out.update(self.extra)
        return out


def prepare_all(loaded: Any, requests: list, decoded: list[dict], *, max_tiles: int = 12) -> list:
    from model_runtime.prompts import prepare
    from worker.jobs.translate import chat_of, sampling_of

    return [
        prepare(loaded.processor, chat_of(request), media, sampling_of(request.generation), request_id=f"bench-{i}",
                max_tiles=max_tiles, context_length=loaded.context_length)
        for i, (request, media) in enumerate(zip(requests, decoded, strict=True))
    ]


def with_sampling(prepared: Any, sampling: Any) -> Any:
    """The same prepared job decoding another way (its cost follows its new max_new_tokens)."""
    return dataclasses.replace(prepared, sampling=sampling,
                               cost=float(prepared.prompt_tokens + sampling.max_new_tokens))


def _outputs(results: list) -> tuple[int, list[list[int]]]:
    for result in results:
        if isinstance(result, BaseException):  # the engines return a failed request's own error in its place
            raise RuntimeError(f"bench job failed: {result!r}") from result
    return sum(r.completion_tokens for r in results), [list(r.token_ids) for r in results]


class _Measure:
    """A static Engine's stats before and after a run."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        s = engine.stats
        self.before = (s.batches, s.padded_tokens, s.total_tokens, s.generate_seconds)
        self.started = time.perf_counter()

    def done(self, results: list) -> EngineRun:
        seconds = time.perf_counter() - self.started
        tokens, ids = _outputs(results)
        s = self.engine.stats
        b = self.before
        return EngineRun(len(results), seconds, tokens, ids, s.batches - b[0], s.padded_tokens - b[1],
                         s.total_tokens - b[2], s.generate_seconds - b[3])


def static_engine(loaded: Any, cap: int) -> Any:
    from model_runtime.engine import Engine

    return Engine(loaded, max_batch_size=cap)


def continuous_engine(loaded: Any, cap: int, knobs: ContinuousKnobs) -> Any:
    from model_runtime.engine_continuous import ContinuousEngine

    # The vision cache off: the mixes ask about a few images many times, and the static engine and one
    # generate per job have no cache; reuse is measured on its own (benchmarks/reuse_bench.py).
    return ContinuousEngine(loaded, max_batch_size=cap, max_batch_tokens=knobs.max_batch_tokens,
                            prefill_chunk_tokens=knobs.prefill_chunk_tokens,
                            vision_chunk_tiles=knobs.vision_chunk_tiles, vision_cache_mb=0)


def static_batcher(engine: Any, *, cap: int, max_wait_ms: float, cost_aware: bool = True,
                   max_batch_cost: float | None = None) -> MicroBatcher:
    """The worker's static queue (worker/model/thread.py) in front of `engine`."""
    return MicroBatcher(
        lambda batch, _info: engine.generate_batch(batch), max_batch_size=cap, max_wait_ms=max_wait_ms,
        max_batch_cost=max_batch_cost, cost=lambda p: p.cost, group_key=lambda p: p.sampling,
        similar_cost=cost_aware, name="bench-model-thread",
    ).start()


def warm_up(loaded: Any, items: list, *, cap: int, knobs: ContinuousKnobs) -> None:
    """First-call allocations off the clock, for both engines (two jobs, a few tokens each)."""
    from model_runtime.types import Sampling

    few = [with_sampling(p, Sampling(max_new_tokens=4)) for p in items[:2]]
    static_engine(loaded, cap).generate_batch(few)
    continuous_engine(loaded, cap, knobs).run_until_done([dataclasses.replace(p) for p in few])


def run_sequential(engine: Any, items: list) -> EngineRun:
    """One generate call per job, one after the other."""
    measure = _Measure(engine)
    return measure.done([engine.generate_batch([item])[0] for item in items])


def run_batched(engine: Any, items: list, *, cap: int, max_wait_ms: float, cost_aware: bool = False,
                max_batch_cost: float | None = None) -> EngineRun:
    """Every job through a MicroBatcher with this cap in front of the static engine, all pending at once."""
    engine_cap = engine.max_batch_size
    engine.max_batch_size = max(engine_cap, cap)  # the engine splits anything above its own cap
    batcher = static_batcher(engine, cap=cap, max_wait_ms=max_wait_ms, cost_aware=cost_aware,
                             max_batch_cost=max_batch_cost)
    try:
        for _ in items:
            batcher.announce()
        measure = _Measure(engine)
        futures = [batcher.submit(item, announced=True) for item in items]
        return measure.done(_results(futures))
    finally:
        batcher.stop(drain=True, timeout=60)
        engine.max_batch_size = engine_cap


def run_continuous(loaded: Any, items: list, *, cap: int, knobs: ContinuousKnobs) -> EngineRun:
    """Every job submitted at once to a StepLoop over a fresh ContinuousEngine with this cap."""
    engine = continuous_engine(loaded, cap, knobs)
    loop = StepLoop(engine, name="bench-step-loop").start()
    try:
        started = time.perf_counter()
        futures = [loop.submit(item) for item in items]
        results = _results(futures)
        seconds = time.perf_counter() - started
    finally:
        loop.stop(drain=True, timeout=60)
    tokens, ids = _outputs(results)
    s = engine.stats
    return EngineRun(len(items), seconds, tokens, ids, generate_seconds=s.generate_seconds,
                     decode_batch=s.mean_decode_batch,
                     extra={"steps": s.steps, "decode_steps": s.decode_steps, "prefill_chunks": s.prefill_chunks,
                            "vision_calls": s.vision_calls, "max_decode_stall_ms": round(s.max_decode_stall_ms, 2),
                            "preempted": s.preempted,
                            "vision_seconds": round(s.vision_seconds, 4),
                            "prefill_seconds": round(s.prefill_seconds, 4),
                            "decode_seconds": round(s.decode_seconds, 4)})


def _results(futures: list) -> list:
    out = []
    for future in futures:
        try:
            out.append(future.result(timeout=3600))
        except Exception as exc:  # noqa: BLE001 - reported as the failed job it is
            out.append(exc)
    return out


def set_torch_threads(threads: int) -> int:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else 0.0


def bench_mix(loaded: Any, items: list, *, caps: list[int], max_wait_ms: float, knobs: ContinuousKnobs,
              max_batch_cost: float | None = None) -> dict[str, Any]:
    """Static and continuous at every cap, between two sequential runs; ratios against the faster one.

    Taking the faster of the two sequential runs means a burst of load from
    elsewhere on the machine can only make the ratios look worse, not better.
    At each cap the static and the continuous run follow each other, so such
    a burst hits both alike.
    """
    warm_up(loaded, items, cap=max(caps), knobs=knobs)
    first = run_sequential(static_engine(loaded, 1), items)
    static: dict[int, EngineRun] = {}
    continuous: dict[int, EngineRun] = {}
    for cap in caps:
        static[cap] = run_batched(static_engine(loaded, cap), items, cap=cap, max_wait_ms=max_wait_ms,
                                  cost_aware=True, max_batch_cost=max_batch_cost)
        continuous[cap] = run_continuous(loaded, items, cap=cap, knobs=knobs)
    second = run_sequential(static_engine(loaded, 1), items)
    sequential = first if first.jobs_per_s >= second.jobs_per_s else second
    runs = [*static.values(), *continuous.values()]
    return {
        "sequential": sequential.as_dict(),
        "sequential_jobs_per_s_runs": [round(first.jobs_per_s, 4), round(second.jobs_per_s, 4)],
        "batched": {str(cap): run.as_dict() for cap, run in static.items()},
        "continuous": {str(cap): run.as_dict() for cap, run in continuous.items()},
        "batched_over_sequential": {str(c): _ratio(r.jobs_per_s, sequential.jobs_per_s) for c, r in static.items()},
        "continuous_over_sequential": {str(c): _ratio(r.jobs_per_s, sequential.jobs_per_s)
                                       for c, r in continuous.items()},
        "continuous_over_static": {str(c): _ratio(continuous[c].jobs_per_s, static[c].jobs_per_s) for c in caps},
        "max_new_tokens_mean": round(sum(p.sampling.max_new_tokens for p in items) / len(items), 1),
        "completion_tokens_mean": round(sequential.tokens / len(items), 1),
        # Greedy decoding: every engine should give every job the tokens it gets alone.
        "same_tokens_as_sequential": round(min(run.same_tokens(sequential) for run in runs), 4),
    }


def bench_grouping(loaded: Any, items: list, *, cap: int, max_wait_ms: float) -> dict[str, Any]:
    """Padding with FIFO batches against batches of similar cost, same jobs, same cap, interleaved (static)."""
    fifo = run_batched(static_engine(loaded, cap), items, cap=cap, max_wait_ms=max_wait_ms, cost_aware=False)
    aware = run_batched(static_engine(loaded, cap), items, cap=cap, max_wait_ms=max_wait_ms, cost_aware=True)
    return {
        "cap": cap,
        "max_new_tokens": sorted({p.sampling.max_new_tokens for p in items}),
        "fifo": round(fifo.padding_fraction, 4),
        "cost_aware": round(aware.padding_fraction, 4),
        "fifo_jobs_per_s": round(fifo.jobs_per_s, 4),
        "cost_aware_jobs_per_s": round(aware.jobs_per_s, 4),
        "cost_aware_over_fifo_jobs_per_s": _ratio(aware.jobs_per_s, fifo.jobs_per_s),
    }


def bench_threads(loaded: Any, items: list, *, cap: int, max_wait_ms: float, choices: list[int],
                  knobs: ContinuousKnobs) -> dict[str, Any]:
    """jobs/s with each torch intra-op thread count: sequential, static and continuous, side by side."""
    out: dict[str, Any] = {}
    previous = set_torch_threads(choices[0])
    try:
        for threads in choices:
            set_torch_threads(threads)
            warm_up(loaded, items, cap=cap, knobs=knobs)
            seq = run_sequential(static_engine(loaded, 1), items[: max(4, len(items) // 2)])
            bat = run_batched(static_engine(loaded, cap), items, cap=cap, max_wait_ms=max_wait_ms, cost_aware=True)
            con = run_continuous(loaded, items, cap=cap, knobs=knobs)
            out[str(threads)] = {"sequential_jobs_per_s": round(seq.jobs_per_s, 4),
                                 "batched_jobs_per_s": round(bat.jobs_per_s, 4),
                                 "continuous_jobs_per_s": round(con.jobs_per_s, 4)}
    finally:
        set_torch_threads(previous)
    first = out[str(choices[0])]
    for threads in choices:
        row = out[str(threads)]
        row["batched_vs_first"] = _ratio(row["batched_jobs_per_s"], first["batched_jobs_per_s"])
        row["continuous_vs_first"] = _ratio(row["continuous_jobs_per_s"], first["continuous_jobs_per_s"])
    return out


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def bench_short_job_latency(loaded: Any, items: list, *, cap: int, max_wait_ms: float, knobs: ContinuousKnobs,
                            long_jobs: int, short_jobs: int = 16, long_tokens: int = 256, short_tokens: int = 16,
                            gap_ms: float = 20.0, settle_ms: float = 50.0) -> dict[str, Any]:
    """Short jobs arriving while long ones decode: submit → result, continuous against static.

    `long_jobs` jobs pinned to `long_tokens` new tokens (min_new_tokens holds
    the random model's EOS back) are submitted at once; `settle_ms` later,
    while they run, `short_jobs` jobs pinned to `short_tokens` arrive one every
    `gap_ms`. A short job's latency runs from its submit to its future
    resolving. Same jobs through the StepLoop + ContinuousEngine and through
    the MicroBatcher (worker's max_wait_ms, cost-aware) + static Engine.
    """
    from model_runtime.types import Sampling

    long_sampling = Sampling(max_new_tokens=long_tokens, min_new_tokens=long_tokens)
    short_sampling = Sampling(max_new_tokens=short_tokens, min_new_tokens=short_tokens)

    def jobs() -> tuple[list, list]:  # fresh objects per run: the queues key their futures by identity
        longs = [with_sampling(items[i % len(items)], long_sampling) for i in range(long_jobs)]
        shorts = [with_sampling(items[(long_jobs + i) % len(items)], short_sampling) for i in range(short_jobs)]
        return longs, shorts

    def measure(queue: Any, announce: bool) -> dict[str, Any]:
        longs, shorts = jobs()
        if announce:  # the static batch forms from every long job, as task threads announcing them would make it
            for _ in longs:
                queue.announce()
        started = time.perf_counter()
        long_futures = [queue.submit(p, announced=announce) for p in longs]
        time.sleep(settle_ms / 1000.0)
        latencies: list[float] = [0.0] * len(shorts)
        futures = []
        lock = threading.Lock()
        first_short = time.perf_counter()
        for i, prepared in enumerate(shorts):
            delay = first_short + i * gap_ms / 1000.0 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            submitted = time.perf_counter()
            future = queue.submit(prepared)

            def done(_f: Any, i: int = i, submitted: float = submitted) -> None:
                with lock:
                    latencies[i] = (time.perf_counter() - submitted) * 1000.0

            future.add_done_callback(done)
            futures.append(future)
        _outputs(_results(futures))
        _outputs(_results(long_futures))
        wall = time.perf_counter() - started
        return {"p50": round(percentile(latencies, 50), 2), "p99": round(percentile(latencies, 99), 2),
                "max": round(max(latencies), 2), "wall_s": round(wall, 3)}

    engine = continuous_engine(loaded, cap, knobs)
    loop = StepLoop(engine, name="bench-step-loop").start()
    try:
        continuous = measure(loop, announce=False)
    finally:
        loop.stop(drain=True, timeout=60)
    continuous["max_decode_stall_ms"] = round(engine.stats.max_decode_stall_ms, 2)
    batcher = static_batcher(static_engine(loaded, cap), cap=cap, max_wait_ms=max_wait_ms)
    try:
        static = measure(batcher, announce=True)
    finally:
        batcher.stop(drain=True, timeout=60)
    return {
        "continuous": continuous, "static": static,
        "static_p50_over_continuous_p50": _ratio(static["p50"], continuous["p50"]),
        "cap": cap, "max_wait_ms": max_wait_ms, "long_jobs": long_jobs, "long_tokens": long_tokens,
        "short_jobs": short_jobs, "short_tokens": short_tokens, "gap_ms": gap_ms, "settle_ms": settle_ms,
    }
