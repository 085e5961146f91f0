"""MicroBatcher with fake work: size, wait, cost, grouping, failures, draining."""

from __future__ import annotations

import threading
import time

import pytest

from worker.model.batcher import BatcherClosed, BatchInfo, MicroBatcher


class Recorder:
    """A batch function that records the batches it saw and can be slowed or broken."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None):
        self.batches: list[list] = []
        self.infos: list[BatchInfo] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items: list, info: BatchInfo) -> list:
        with self.lock:
            self.batches.append(list(items))
            self.infos.append(info)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [("done", x) for x in items]


def wait_started(rec: Recorder, n: int = 1) -> None:
    """Block until the model thread has taken n batches (so later submits queue up)."""
    end = time.monotonic() + 5
    while len(rec.batches) < n and time.monotonic() < end:
        time.sleep(0.001)


def make(rec, **kw) -> MicroBatcher:
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_wait_ms", 50)
    return MicroBatcher(rec, **kw).start()


def test_results_map_back_to_their_items():
    rec = Recorder()
    b = make(rec)
    futs = {i: b.submit(i) for i in range(10)}
    assert {i: f.result(timeout=5) for i, f in futs.items()} == {i: ("done", i) for i in range(10)}
    b.stop()


def test_size_limit_caps_every_batch():
    rec = Recorder(delay_s=0.05)
    b = make(rec, max_batch_size=3, max_wait_ms=200)
    futs = [b.submit(i) for i in range(10)]
    [f.result(timeout=5) for f in futs]
    b.stop()
    assert max(len(x) for x in rec.batches) == 3
    assert sorted(x for batch in rec.batches for x in batch) == list(range(10))


def test_single_item_goes_at_once_when_nothing_else_is_announced():
    rec = Recorder()
    b = make(rec, max_wait_ms=2000)
    t0 = time.monotonic()
    b.submit("only").result(timeout=5)
    assert time.monotonic() - t0 < 0.5  # far below max_wait: no reason to wait
    b.stop()


def test_waits_for_announced_items_up_to_max_wait():
    rec = Recorder()
    b = make(rec, max_wait_ms=300)
    b.announce()
    b.announce()
    f1 = b.submit("a", announced=True)
    time.sleep(0.05)
    f2 = b.submit("b", announced=True)
    f1.result(timeout=5), f2.result(timeout=5)
    assert rec.batches == [["a", "b"]]  # the first waited for the second
    b.stop()


def test_max_wait_bounds_the_wait_for_stragglers():
    rec = Recorder()
    b = make(rec, max_wait_ms=100)
    b.announce()
    b.announce()  # this one never comes
    t0 = time.monotonic()
    b.submit("a", announced=True).result(timeout=5)
    waited = time.monotonic() - t0
    assert 0.08 <= waited < 1.0
    b.withdraw()
    b.stop()


def test_withdraw_releases_the_wait():
    rec = Recorder()
    b = make(rec, max_wait_ms=5000)
    b.announce()
    b.announce()
    f = b.submit("a", announced=True)
    time.sleep(0.05)
    assert not f.done()
    b.withdraw()
    f.result(timeout=2)
    b.stop()


def test_cost_limit_splits_expensive_items():
    rec = Recorder(delay_s=0.05)
    b = make(rec, max_batch_size=8, max_batch_cost=10, cost=lambda x: x, max_wait_ms=100)
    block = b.submit(1)  # occupies the model thread while the rest queue up
    wait_started(rec)
    futs = [b.submit(c) for c in (6, 6, 3, 1)]
    block.result(timeout=5)
    [f.result(timeout=5) for f in futs]
    b.stop()
    for info in rec.infos:
        assert info.cost <= 10 or info.size == 1
    assert [6, 6] not in rec.batches


def test_single_item_over_cost_still_runs_alone():
    rec = Recorder()
    b = make(rec, max_batch_cost=5, cost=lambda x: x)
    assert b.submit(50).result(timeout=5) == ("done", 50)
    b.stop()


def test_groups_never_mix_and_oldest_group_goes_first():
    rec = Recorder(delay_s=0.05)
    b = make(rec, max_batch_size=8, group_key=lambda x: x[0], max_wait_ms=100)
    block = b.submit(("z", 0))
    wait_started(rec)
    futs = [b.submit(x) for x in [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]]
    block.result(timeout=5)
    [f.result(timeout=5) for f in futs]
    b.stop()
    for batch in rec.batches:
        assert len({x[0] for x in batch}) == 1
    assert rec.batches[1] == [("a", 1), ("a", 2), ("a", 3)]
    assert rec.batches[2] == [("b", 1), ("b", 2)]


def test_a_lower_rank_goes_before_older_items_of_a_higher_one():
    rec = Recorder(delay_s=0.05)
    b = make(rec, max_batch_size=2, rank=lambda x: int(x.startswith("batch")))
    block = b.submit("first")
    wait_started(rec)
    futs = [b.submit(x) for x in ["batch-1", "batch-2", "batch-3", "urgent"]]
    block.result(timeout=5)
    [f.result(timeout=5) for f in futs]
    b.stop()
    assert rec.batches[1] == ["urgent", "batch-1"] and rec.batches[2] == ["batch-2", "batch-3"]


def test_failing_batch_fails_each_of_its_requests_only():
    rec = Recorder(delay_s=0.02, fail_on="bad")
    b = make(rec, max_batch_size=2, max_wait_ms=100)
    block = b.submit("x")
    wait_started(rec)
    f_bad, f_mate = b.submit("bad"), b.submit("mate")
    f_next = b.submit("next")
    block.result(timeout=5)
    with pytest.raises(RuntimeError, match="boom"):
        f_bad.result(timeout=5)
    with pytest.raises(RuntimeError, match="boom"):
        f_mate.result(timeout=5)
    assert f_next.result(timeout=5) == ("done", "next")
    b.stop()


def test_per_item_exceptions_are_delivered_to_their_own_future():
    def run(items, info):
        return [ValueError(x) if x == "bad" else x for x in items]

    b = MicroBatcher(run, max_batch_size=4, max_wait_ms=50).start()
    fb, fg = b.submit("bad"), b.submit("good")
    with pytest.raises(ValueError):
        fb.result(timeout=5)
    assert fg.result(timeout=5) == "good"
    b.stop()


def test_stop_with_drain_finishes_pending_and_refuses_new():
    rec = Recorder(delay_s=0.05)
    b = make(rec, max_batch_size=2)
    futs = [b.submit(i) for i in range(5)]
    b.stop(drain=True, timeout=5)
    assert [f.result(timeout=0) for f in futs] == [("done", i) for i in range(5)]
    with pytest.raises(BatcherClosed):
        b.submit(99)


def test_stop_without_drain_hands_pending_items_back():
    rec = Recorder(delay_s=0.2)
    b = make(rec, max_batch_size=1)
    first = b.submit("running")
    time.sleep(0.05)
    rest = [b.submit(i) for i in range(3)]
    handed_back = b.stop(drain=False, timeout=5)
    assert first.result(timeout=1) == ("done", "running")  # the batch in flight completes
    assert handed_back == [0, 1, 2]
    for f in rest:
        with pytest.raises(BatcherClosed):
            f.result(timeout=1)


def test_wait_times_are_reported_per_item():
    rec = Recorder()
    b = make(rec, max_wait_ms=80)
    b.announce()
    b.announce()
    f = b.submit("a", announced=True)
    f.result(timeout=5)
    b.withdraw()
    b.stop()
    assert rec.infos[0].waited_s[0] >= 0.07


def test_concurrent_submitters_are_all_served():
    rec = Recorder(delay_s=0.005)
    b = make(rec, max_batch_size=8, max_wait_ms=5)
    results, lock = [], threading.Lock()

    def worker(n):
        for i in range(25):
            r = b.submit((n, i)).result(timeout=10)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    b.stop()
    assert len(results) == 200
    assert max(len(x) for x in rec.batches) > 1  # concurrency produced real batches


def test_batcher_imports_neither_celery_nor_torch():
    import subprocess
    import sys

    code = "import sys, worker.model.batcher; print('celery' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
