"""The bare engine: one `generate` per job against the MicroBatcher feeding `Engine.generate_batch`.

The batched runs use the real MicroBatcher the worker uses, fed the way the
task threads feed it: every job is announced first (the task threads announce
when they start preparing), then submitted, so batches form as they would at
saturation. Preprocessing is done before the clock starts; what is timed is
the model thread alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from worker.batcher import MicroBatcher


@dataclass
class EngineRun:
    jobs: int
    seconds: float
    batches: int
    padded_tokens: int
    total_tokens: int
    generate_seconds: float

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_fraction(self) -> float:
        return self.padded_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def mean_batch(self) -> float:
        return self.jobs / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"jobs": self.jobs, "seconds": round(self.seconds, 4), "jobs_per_s": round(self.jobs_per_s, 4),
                "batches": self.batches, "mean_batch": round(self.mean_batch, 2),
                "padding_fraction": round(self.padding_fraction, 4)}


def prepare_all(loaded: Any, requests: list, decoded: list[dict], *, max_tiles: int = 12) -> list:
    from model_runtime.prompts import prepare
    from worker.translate import chat_of, sampling_of

    return [
        prepare(loaded.processor, chat_of(request), media, sampling_of(request.generation), request_id=f"bench-{i}",
                max_tiles=max_tiles, context_length=loaded.context_length)
        for i, (request, media) in enumerate(zip(requests, decoded))
    ]


class _Measure:
    """Engine.stats before and after a run."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        s = engine.stats
        self.before = (s.batches, s.padded_tokens, s.total_tokens, s.generate_seconds)
        self.started = time.perf_counter()

    def done(self, jobs: int) -> EngineRun:
        seconds = time.perf_counter() - self.started
        s = self.engine.stats
        b = self.before
        return EngineRun(jobs, seconds, s.batches - b[0], s.padded_tokens - b[1], s.total_tokens - b[2],
                         s.generate_seconds - b[3])


def run_sequential(engine: Any, items: list) -> EngineRun:
    """One generate call per job, one after the other."""
    measure = _Measure(engine)
    for item in items:
        result = engine.generate_batch([item])[0]
        if not hasattr(result, "text"):
            raise RuntimeError(f"bench job failed: {result}")
    return measure.done(len(items))


def run_batched(engine: Any, items: list, *, cap: int, max_wait_ms: float, cost_aware: bool = False,
                max_batch_cost: float | None = None) -> EngineRun:
    """Every job through a MicroBatcher with this cap, all of them pending at once."""
    engine_cap = engine.max_batch_size
    engine.max_batch_size = max(engine_cap, cap)  # the engine splits anything above its own cap
    batcher = MicroBatcher(
        lambda batch, _info: engine.generate_batch(batch), max_batch_size=cap, max_wait_ms=max_wait_ms,
        max_batch_cost=max_batch_cost, cost=lambda p: p.cost, group_key=lambda p: p.sampling,
        similar_cost=cost_aware, name="bench-model-thread",
    ).start()
    try:
        for _ in items:
            batcher.announce()
        measure = _Measure(engine)
        futures = [batcher.submit(item, announced=True) for item in items]
        for future in futures:
            result = future.result(timeout=3600)
            if not hasattr(result, "text"):
                raise RuntimeError(f"bench job failed: {result}")
        return measure.done(len(items))
    finally:
        batcher.stop(drain=True, timeout=60)
        engine.max_batch_size = engine_cap


def set_torch_threads(threads: int) -> int:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def bench_mix(engine: Any, items: list, *, caps: list[int], max_wait_ms: float) -> dict[str, Any]:
    """The batcher at every cap between two sequential runs; ratios against the faster sequential run.

    Taking the faster of the two sequential runs means a burst of load from
    elsewhere on the machine can only make the ratios look worse, not better.
    """
    engine.generate_batch(items[: min(2, len(items))])  # first-call allocations off the clock
    first = run_sequential(engine, items)
    runs = {cap: run_batched(engine, items, cap=cap, max_wait_ms=max_wait_ms) for cap in caps}
    second = run_sequential(engine, items)
    sequential = first if first.jobs_per_s >= second.jobs_per_s else second
    return {
        "sequential": sequential.as_dict(),
        "batched": {str(cap): run.as_dict() for cap, run in runs.items()},
        "batched_over_sequential": {str(cap): round(run.jobs_per_s / sequential.jobs_per_s, 3)
                                    for cap, run in runs.items()},
    }


def bench_grouping(engine: Any, items: list, *, cap: int, max_wait_ms: float) -> dict[str, Any]:
    """Padding with FIFO batches against batches of similar cost, same jobs, same cap, interleaved."""
    fifo = run_batched(engine, items, cap=cap, max_wait_ms=max_wait_ms, cost_aware=False)
    aware = run_batched(engine, items, cap=cap, max_wait_ms=max_wait_ms, cost_aware=True)
    return {
        "cap": cap,
        "fifo": round(fifo.padding_fraction, 4),
        "cost_aware": round(aware.padding_fraction, 4),
        "fifo_jobs_per_s": round(fifo.jobs_per_s, 4),
        "cost_aware_jobs_per_s": round(aware.jobs_per_s, 4),
        "cost_aware_over_fifo_jobs_per_s": round(aware.jobs_per_s / fifo.jobs_per_s, 3),
    }


def bench_threads(engine: Any, items: list, *, cap: int, max_wait_ms: float, choices: list[int]) -> dict[str, Any]:
    """jobs/s with each torch intra-op thread count, sequential and batched, side by side."""
    out: dict[str, Any] = {}
    previous = set_torch_threads(choices[0])
    try:
        for threads in choices:
            set_torch_threads(threads)
            engine.generate_batch(items[:1])
            seq = run_sequential(engine, items[: max(4, len(items) // 2)])
            bat = run_batched(engine, items, cap=cap, max_wait_ms=max_wait_ms)
            out[str(threads)] = {"sequential_jobs_per_s": round(seq.jobs_per_s, 4),
                                 "batched_jobs_per_s": round(bat.jobs_per_s, 4)}
    finally:
        set_torch_threads(previous)
    base = out[str(choices[0])]["batched_jobs_per_s"]
    for threads in choices:
        out[str(threads)]["batched_vs_first"] = round(out[str(threads)]["batched_jobs_per_s"] / base, 3)
    return out
