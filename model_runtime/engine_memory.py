"""What the continuous engine does when memory runs out or a computation raises: per request, never per batch.

- Out of memory while joining: the joiners go back to the queue in arrival
  order; fewer join at a time, and one alone beside running rows waits until
  a row leaves. Alone with nothing else held, it ends `TooLargeForGPU`.
- Out of memory mid-decode: the newest row is preempted (its cache dropped,
  queued again to be recomputed from scratch, an unseeded sampled one with the
  seed it drew from, so it recomputes the tokens its progress already showed);
  alone, it ends `TooLargeForGPU`. The same `_preempt` makes room for an
  interactive request behind a batch full of batch-class rows
  (model_runtime/engine_admission.py).
- Any other exception fails the requests of the computation that raised.

A mixin of `ContinuousEngine` (model_runtime/engine_continuous.py): it works
on that engine's queues and limits.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections import deque

import structlog
import torch

from model_runtime.running_batch import ContinuousStats, Joining, RunningBatch
from model_runtime.types import GenerationFailed, Prepared, TooLargeForGPU

log = structlog.get_logger(__name__)


class MemoryPolicy:
    # The engine's state this works on (set by ContinuousEngine.__init__).
    stats: ContinuousStats
    _waiting: deque[tuple[Prepared, float]]
    _joining: list[Joining]
    _running: RunningBatch | None
    _ready: list[RunningBatch]
    _join_limit: int
    _admit_below: int | None

    def _joining_failed(self, joiners: list[Joining], exc: Exception, finished: list) -> None:
        for joining in joiners:
            if joining in self._joining:
                self._joining.remove(joining)
        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            log.error("join_failed", requests=[j.prepared.request_id for j in joiners], error=repr(exc),
                      traceback=traceback.format_exc())
            for joining in joiners:
                finished.append((joining.prepared, as_failure(exc)))
            return
        del exc  # the traceback pins the tensors of the failed call
        empty_cuda_cache()
        self.stats.join_ooms += 1
        # Rows decoding, and rows prefilled this step that join at its end: either frees memory when it leaves.
        running = (len(self._running) if self._running else 0) + sum(len(batch) for batch in self._ready)
        if len(joiners) == 1 and running == 0 and not self._joining:
            prepared = joiners[0].prepared
            log.warning("too_large_for_gpu", request_id=prepared.request_id, prompt_tokens=prepared.prompt_tokens)
            finished.append((prepared, TooLargeForGPU(
                f"out of GPU memory even alone ({prepared.prompt_tokens} prompt tokens, {prepared.tiles} tiles); "
                "use fewer or smaller media or fewer frames")))
            return
        for joining in joiners:  # back in the queue: interactive first, then in arrival order
            self._waiting.append((joining.prepared, joining.row.added_at))
        self._waiting = deque(sorted(self._waiting, key=lambda entry: (entry[0].batch_class, entry[1])))
        # Fewer joiners at a time (split); one alone beside running rows waits until some leave.
        self._join_limit = max(1, (len(self._joining) + len(joiners)) // 2)
        if len(joiners) == 1 and not self._joining:
            self._admit_below = running
        log.warning("join_oom_wait", requests=[j.prepared.request_id for j in joiners], running=running,
                    join_limit=self._join_limit)

    def _decode_oom(self, finished: list) -> None:
        empty_cuda_cache()
        batch = self._running
        assert batch is not None
        newest, row = max(batch.live(), key=lambda live: live[1].admitted_at)
        if len(batch) == 1:
            log.warning("too_large_for_gpu", request_id=row.request_id, cached=batch.columns)
            finished.append((row.prepared, TooLargeForGPU(
                f"out of GPU memory decoding alone at {batch.columns} tokens; use fewer new tokens or less media")))
            self._running = None
            return
        self._preempt(newest, "out of memory")
        self._admit_below = len(batch)  # it rejoins once a row has left

    def _preempt(self, index: int, reason: str) -> None:
        """Take the running row at `index` out, its cache dropped; it waits first in its class and is recomputed
        from scratch when it rejoins (greedy and seeded rows give the same tokens again)."""
        batch = self._running
        assert batch is not None
        row = batch.rows[index]
        batch.retire(index)
        if len(batch):
            batch.compact()  # free its memory now
        else:
            self._running = None
        if row.generator is not None and row.prepared.sampling.seed is None:
            row.prepared.sampling = dataclasses.replace(row.prepared.sampling, seed=row.generator.initial_seed())
        self._waiting.appendleft((row.prepared, row.added_at))
        self._waiting = deque(sorted(self._waiting, key=lambda entry: entry[0].batch_class))  # stable: first in class
        self.stats.preempted += 1
        log.warning("preempted", request_id=row.request_id, generated=len(row.generated), running=len(batch),
                    reason=reason)


def as_failure(exc: BaseException) -> BaseException:
    if isinstance(exc, (GenerationFailed, TooLargeForGPU)):
        return exc
    return GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")


def empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
