"""StepLoop with a fake step engine: join at step boundaries, leave when done, failures, draining."""

from __future__ import annotations

import threading
import time

import pytest

from worker.model.batcher import BatcherClosed
from worker.model.steploop import StepLoop


class FakeEngine:
    """Each item is (name, steps): it finishes after that many steps; `slow_s` per step."""

    def __init__(self, slow_s: float = 0.0, broken_step: int | None = None, capacity: int = 1000):
        self.capacity = capacity  # running at most this many; the rest wait in the engine
        self.waiting: list = []
        self.running: dict = {}
        self.steps = 0
        self.slow_s = slow_s
        self.broken_step = broken_step
        self.running_per_step: list[set] = []
        self.lock = threading.Lock()

    def add(self, item) -> None:
        self.waiting.append(item)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_waiting(self) -> list:
        taken, self.waiting = self.waiting, []
        return taken

    def abort(self, error) -> list:
        everyone = self.waiting + list(self.running)
        self.waiting, self.running = [], {}
        return [(item, error) for item in everyone]

    def step(self) -> list:
        self.steps += 1
        if self.broken_step == self.steps:
            raise RuntimeError("step broke")
        while self.waiting and len(self.running) < self.capacity:
            item = self.waiting.pop(0)
            self.running[item] = item[1]
        with self.lock:
            self.running_per_step.append({item[0] for item in self.running})
        if self.slow_s:
            time.sleep(self.slow_s)
        done = []
        for item in list(self.running):
            self.running[item] -= 1
            if self.running[item] == 0:
                del self.running[item]
                done.append((item, ValueError(item[0]) if item[0].startswith("bad") else f"out-{item[0]}"))
        return done


def test_each_future_gets_its_own_result_as_soon_as_it_is_done():
    engine = FakeEngine(slow_s=0.002)
    loop = StepLoop(engine).start()
    long, short = loop.submit(("long", 50)), loop.submit(("short", 2))
    assert short.result(timeout=5) == "out-short"
    assert not long.done()  # the short one did not wait for its long neighbour
    assert long.result(timeout=5) == "out-long"
    loop.stop()


def test_a_request_submitted_mid_run_joins_the_running_ones():
    engine = FakeEngine(slow_s=0.003)
    loop = StepLoop(engine).start()
    first = loop.submit(("first", 40))
    time.sleep(0.03)
    late = loop.submit(("late", 3))
    assert late.result(timeout=5) == "out-late"
    assert any({"first", "late"} <= names for names in engine.running_per_step)
    assert first.result(timeout=5) == "out-first"
    loop.stop()


def test_an_exception_result_reaches_only_its_own_future():
    loop = StepLoop(FakeEngine()).start()
    bad, good = loop.submit(("bad-1", 2)), loop.submit(("good", 2))
    with pytest.raises(ValueError, match="bad-1"):
        bad.result(timeout=5)
    assert good.result(timeout=5) == "out-good"
    loop.stop()


def test_a_broken_step_fails_what_it_held_and_the_thread_lives_on():
    engine = FakeEngine(broken_step=1)
    loop = StepLoop(engine).start()
    held = loop.submit(("held", 3))
    with pytest.raises(RuntimeError, match="step broke"):
        held.result(timeout=5)
    assert loop.submit(("after", 1)).result(timeout=5) == "out-after"
    loop.stop()


def test_wrap_sees_the_run_number_which_counts_busy_periods():
    loop = StepLoop(FakeEngine(), wrap=lambda item, result, info: (result, info.run)).start()
    assert loop.submit(("a", 1)).result(timeout=5) == ("out-a", 1)
    time.sleep(0.02)  # idle in between: a new busy period
    assert loop.submit(("b", 1)).result(timeout=5) == ("out-b", 2)
    loop.stop()


def test_drain_finishes_the_running_and_hands_back_the_rest():
    engine = FakeEngine(slow_s=0.002, capacity=1)
    loop = StepLoop(engine).start()
    running = loop.submit(("running", 30))
    time.sleep(0.02)  # admitted and stepping; the engine is full
    queued = loop.submit(("queued", 5))
    loop.stop(drain=False, timeout=5)
    assert running.result(timeout=1) == "out-running"
    with pytest.raises(BatcherClosed):
        queued.result(timeout=1)
    with pytest.raises(BatcherClosed):
        loop.submit(("too-late", 1))


def test_drain_timeout_ends_what_still_runs_with_batcher_closed():
    loop = StepLoop(FakeEngine(slow_s=0.01)).start()
    endless = loop.submit(("endless", 10_000))
    time.sleep(0.03)
    started = time.monotonic()
    loop.stop(drain=False, timeout=0.1)
    with pytest.raises(BatcherClosed, match="drain timeout"):
        endless.result(timeout=2)
    assert time.monotonic() - started < 2


def test_pending_counts_announced_and_unfinished():
    loop = StepLoop(FakeEngine(slow_s=0.005)).start()
    loop.announce()
    assert loop.pending == 1
    future = loop.submit(("x", 30), announced=True)
    assert loop.pending == 1
    future.result(timeout=5)
    assert loop.pending == 0
    loop.announce()
    loop.withdraw()
    assert loop.pending == 0
    loop.stop()
