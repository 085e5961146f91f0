"""MicroBatcher: gathers requests from many task threads into batches for one model thread.

Pure Python (threading only); it imports neither celery nor torch, so it is
tested alone with fake work in milliseconds. Like Ray Serve's batch queue: a
size limit, a wait limit, and an optional cost function so a 12-tile image or
a video counts for more than a text prompt.

When does a batch go?
- as soon as it is full (max_batch_size items or max_batch_cost),
- as soon as nothing else is on its way: task threads `announce()` a request
  when they start preparing it, so when every announced request has arrived
  there is no reason to wait for more (an idle worker adds no latency),
- or when the oldest pending item has waited max_wait_ms.
Items batch together only when their group keys are equal (same decoding
parameters); the oldest item's group goes first, so no group starves, except
that a lower `rank` goes before any higher one (the worker ranks interactive
jobs before a batch file's).
With `similar_cost`, the oldest item is joined by the pending items whose
cost is closest to its own rather than by the next oldest: a backlog then
forms batches of like-sized prompts, which pad less (benchmarks/BENCHMARKS.md).
If the batch function raises, every request of that batch gets the error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """Raised by submit() once the batcher is stopping: hand the job back."""


@dataclass
class BatchInfo:
    """What the model thread knows about one batch, passed to the batch function."""

    size: int
    cost: float
    waited_s: list[float]  # per item: time between submit and dispatch


@dataclass
class _Pending(Generic[T]):
    item: T
    future: Future
    cost: float
    group: Hashable
    submitted: float = field(default=0.0)
    rank: int = 0  # lower goes first (interactive 0, batch class 1), then the oldest


class ModelThreadQueue:
    """The task-thread side both model-thread queues share (this MicroBatcher, worker/model/steploop.py's
    StepLoop): start the one model thread, and count requests being prepared (`announce`/`withdraw`)."""

    def __init__(self, loop: Callable[[], None], name: str) -> None:
        self._cond = threading.Condition()
        self._announced = 0
        self._thread = threading.Thread(target=loop, name=name, daemon=True)

    def start(self):  # returns self, the subclass
        self._thread.start()
        return self

    def announce(self) -> None:
        """A request is being prepared and will be submitted (or withdrawn) soon."""
        with self._cond:
            self._announced += 1

    def withdraw(self) -> None:
        """An announced request will not come (its preparation failed)."""
        with self._cond:
            self._announced = max(0, self._announced - 1)
            self._cond.notify_all()


class MicroBatcher(ModelThreadQueue, Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T], BatchInfo], Sequence[R | BaseException]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_batch_cost: float | None = None,
        cost: Callable[[T], float] = lambda _: 1.0,
        group_key: Callable[[T], Hashable] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
        on_loop: Callable[[], None] | None = None,
        name: str = "micro-batcher",
        similar_cost: bool = False,
        rank: Callable[[T], int] = lambda _: 0,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_cost = max_batch_cost
        self._cost = cost
        self._group_key = group_key
        self._clock = clock
        self._on_loop = on_loop
        self.similar_cost = similar_cost
        self._rank = rank
        super().__init__(self._loop, name)
        self._pending: list[_Pending[T]] = []
        self._closing = False

    # ---- task-thread side ---------------------------------------------

    def submit(self, item: T, *, announced: bool = False) -> Future:
        """Queue one item; the future resolves to its result or exception."""
        fut: Future = Future()
        with self._cond:
            if announced:
                self._announced = max(0, self._announced - 1)
            if self._closing:
                raise BatcherClosed("batcher is stopping")
            self._pending.append(
                _Pending(item, fut, float(self._cost(item)), self._group_key(item), self._clock(), self._rank(item))
            )
            self._cond.notify_all()
        return fut

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + self._announced

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> list[T]:
        """Stop taking items. With drain, pending items still run; without, they
        are failed with BatcherClosed and returned so the caller can requeue them."""
        with self._cond:
            self._closing = True
            dropped: list[_Pending[T]] = []
            if not drain:
                dropped, self._pending = self._pending, []
            self._cond.notify_all()
        for p in dropped:
            p.future.set_exception(BatcherClosed("batcher stopped before this item ran"))
        if self._thread.is_alive():
            self._thread.join(timeout)
        return [p.item for p in dropped]

    # ---- model-thread side ---------------------------------------------
    def _take_batch(self) -> list[_Pending[T]] | None:
        """Wait until a batch should go; None when closing and empty."""
        with self._cond:
            while True:
                if self._on_loop:
                    self._on_loop()
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait(timeout=1.0)
                    continue
                ranked = sorted(self._pending, key=lambda p: p.rank)  # stable: the oldest first within a rank
                group = ranked[0].group
                same = [p for p in ranked if p.group == group]
                if self.similar_cost and len(same) > 2:
                    oldest = same[0]
                    same = [oldest] + sorted(same[1:], key=lambda p: abs(p.cost - oldest.cost))
                chosen = self._fill(same)
                full = len(chosen) < len(same) or len(chosen) >= self.max_batch_size
                nothing_coming = self._announced == 0
                waited = self._clock() - self._pending[0].submitted
                if full or nothing_coming or self._closing or waited >= self.max_wait_s:
                    ids = {id(p) for p in chosen}
                    self._pending = [p for p in self._pending if id(p) not in ids]
                    return chosen
                self._cond.wait(timeout=max(0.0005, self.max_wait_s - waited))

    def _fill(self, candidates: list[_Pending[T]]) -> list[_Pending[T]]:
        chosen: list[_Pending[T]] = []
        cost = 0.0
        for p in candidates:
            if len(chosen) >= self.max_batch_size:
                break
            if self.max_batch_cost is not None and chosen and cost + p.cost > self.max_batch_cost:
                break
            chosen.append(p)
            cost += p.cost
        return chosen

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = self._clock()
            info = BatchInfo(size=len(batch), cost=sum(p.cost for p in batch),
                             waited_s=[now - p.submitted for p in batch])
            try:
                results: Sequence[Any] = self._run_batch([p.item for p in batch], info)
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - every request of a failed batch gets the error
                results = [exc] * len(batch)
            for p, res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    p.future.set_exception(res)
                else:
                    p.future.set_result(res)
