"""StepLoop: the model thread of the continuous engine, and its admission queue.

Pure Python (threading only); it imports neither celery nor torch, so it is
tested alone with a fake engine in milliseconds. Task threads `submit`
prepared requests from anywhere; the one model thread hands them to the
engine at the next step boundary and calls `engine.step()` while the engine
has work, resolving each request's future the moment the engine reports it
finished. Nothing waits for a batch to fill: a request that arrives while
others decode joins them at the next step.

Draining (`stop(drain=False)`): admission stops at once; requests not yet
admitted fail with `BatcherClosed` (the pipeline hands those jobs back
uncounted); running ones keep stepping until they finish or the drain
timeout passes, and then fail with `BatcherClosed` too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog

from worker.model.batcher import BatcherClosed, ModelThreadQueue

log = structlog.get_logger(__name__)

T = TypeVar("T")


class StepEngine(Protocol[T]):
    """What the loop needs of an engine (model_runtime.engine_continuous.ContinuousEngine)."""

    def add(self, item: T) -> None: ...
    def step(self) -> list[tuple[T, Any]]: ...
    def has_work(self) -> bool: ...
    def take_waiting(self) -> list[T]: ...
    def abort(self, error: BaseException) -> list[tuple[T, Any]]: ...


@dataclass(frozen=True)
class RunInfo:
    """Where a finished request ran: `run` counts the engine's busy periods (idle → busy)."""

    run: int


class StepLoop(ModelThreadQueue, Generic[T]):
    def __init__(self, engine: StepEngine[T], *, on_loop: Callable[[], None] | None = None,
                 wrap: Callable[[T, Any, RunInfo], Any] = lambda _item, result, _info: result,
                 clock: Callable[[], float] = time.monotonic, name: str = "model-thread",
                 before_submit: Callable[[T], None] | None = None) -> None:
        self.engine = engine
        self._before_submit = before_submit  # runs on the submitting thread (the vision cache's tile digests)
        self._on_loop = on_loop
        self._wrap = wrap
        self._clock = clock
        super().__init__(self._loop, name)
        self._inbox: list[T] = []
        self._futures: dict[int, Future] = {}  # id(item) -> its future
        self._closing = False
        self._drain_all = True
        self._drain_deadline: float | None = None
        self._run = 0

    # ---- task-thread side ---------------------------------------------

    def submit(self, item: T, *, announced: bool = False) -> Future:
        future: Future = Future()
        if self._before_submit is not None:
            try:
                self._before_submit(item)
            except Exception as exc:  # noqa: BLE001 - only work done ahead of the engine; it is done there again
                log.warning("before_submit_failed", error=repr(exc))
        with self._cond:
            if announced:
                self._announced = max(0, self._announced - 1)
            if self._closing:
                raise BatcherClosed("the model thread is stopping")
            self._inbox.append(item)
            self._futures[id(item)] = future
            self._cond.notify_all()
        return future

    @property
    def pending(self) -> int:
        """Requests submitted and not finished, plus those being prepared."""
        with self._cond:
            return len(self._futures) + self._announced

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting. drain=True: everything submitted still runs. drain=False: only what the
        engine already admitted runs, for at most `timeout` seconds; the rest fails with BatcherClosed."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._drain_all = drain
                self._drain_deadline = None if timeout is None else self._clock() + timeout
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(None if timeout is None else timeout + 5)

    # ---- model-thread side ---------------------------------------------
    def _next_inbox(self) -> list[T] | None:
        """Wait for work; None when closing and nothing is left."""
        with self._cond:
            while True:
                if self._on_loop:
                    self._on_loop()
                if self._inbox or self.engine.has_work():
                    inbox, self._inbox = self._inbox, []
                    return inbox
                if self._closing:
                    return None
                self._cond.wait(timeout=1.0)

    def _loop(self) -> None:
        while True:
            inbox = self._next_inbox()
            if inbox is None:
                return
            if not self.engine.has_work():
                self._run += 1
            if self._closing and not self._drain_all:
                self._resolve([(item, BatcherClosed("worker draining")) for item in inbox + self.engine.take_waiting()])
                inbox = []
            for item in inbox:
                self.engine.add(item)
            if self._drain_deadline is not None and self._clock() >= self._drain_deadline:
                self._resolve(self.engine.abort(BatcherClosed("drain timeout passed before this request finished")))
                continue
            try:
                finished = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a broken step fails what it held, the thread lives on
                log.error("step_failed", error=repr(exc))
                finished = self.engine.abort(exc)
            self._resolve(finished)

    def _resolve(self, finished: list[tuple[T, Any]]) -> None:
        for item, result in finished:
            with self._cond:
                future = self._futures.pop(id(item), None)
            if future is None:
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(self._wrap(item, result, RunInfo(self._run)))
