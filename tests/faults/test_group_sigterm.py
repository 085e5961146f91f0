"""SIGTERM sent to a worker's whole process group, as systemd and some supervisors send it.

The preprocessing processes must leave shutdown to the worker: they run in a group of
their own, so the signal misses them, and the worker drains as it does on a plain
SIGTERM. Before, the children got the same SIGTERM and died, one holding a job in 2 of
5 runs: that job failed with `preprocess_crashed` and the exit took 8-10 s, not 2-3 s.

Each round: a worker runs one-tile jobs, its group gets SIGTERM mid-run, and the next
round's worker (then a last one) runs what was handed back. In the second round some
jobs have 12 tiles (long preprocessing), and the children are also SIGKILLed right
after the SIGTERM while one prepares a job (what a cgroup-wide stop or the OOM killer
does mid-drain): the jobs they held are handed back, not failed. No job may fail. The
first check, that no child shares the worker's process group, holds every time; the
failure it prevents showed in 2 of 5 runs, so each round repeats what one run did.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from api_client import JobRequest
from model_runtime.samples import make_sample_image
from tests.faults.common import record, wait_all

ROUNDS = 2
JOBS = 40
DRAIN_TIMEOUT_S = 10
EXIT_LIMIT_S = 7.5  # a drain of one-tile jobs: 2-4 s measured here under load; the children's death made it 8-10 s


def _mid_run(client, ids: list[str], timeout: float = 90) -> None:
    """Until some of the jobs have succeeded and more are still to run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [client.jobs.state(j) for j in ids]
        if states.count("succeeded") >= 5 and states.count("queued") + states.count("running") >= 10:
            return
        time.sleep(0.02)
    raise AssertionError(f"never mid-run: {sorted(set(states))}")


def _busy(children: list[psutil.Process], timeout: float = 20) -> None:
    """Until a child is preparing a job (its CPU time grows), so that killing it kills a job in hand."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [sum(c.cpu_times()[:2]) for c in children]
        time.sleep(0.03)
        if any(sum(c.cpu_times()[:2]) > b + 0.01 for c, b in zip(children, before, strict=True)):
            return
    raise AssertionError("no preprocessing process was ever busy")


def test_sigterm_to_the_process_group_fails_no_job(redis_srv, client, spawn, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "one.jpg").write_bytes(make_sample_image(448, 448, seed=4))  # one 448-pixel tile
    (media / "many.jpg").write_bytes(make_sample_image(2400, 1800, seed=5))  # 12 tiles: long preprocessing
    urls = [f"file://{media / 'one.jpg'}", f"file://{media / 'one.jpg'}", f"file://{media / 'many.jpg'}"]
    settings = dict(max_batch_size=8, lease_s=5, visibility_timeout_s=30, drain_timeout_s=DRAIN_TIMEOUT_S,
                    allowed_file_root=media, preprocess_workers=2)
    all_ids, exits, rows = [], [], []
    for rnd in range(ROUNDS):
        worker = spawn(f"group-{rnd}", **settings)
        worker.wait_ready(redis_srv.url)
        children = psutil.Process(worker.pid).children(recursive=True)
        assert len(children) == 2, children
        assert all(os.getpgid(c.pid) != worker.pid for c in children), "a child in the worker's process group"
        # Round 1 kills the children mid-drain: some jobs there take long to prepare, so one is in hand.
        ids = client.submit_many(JobRequest.simple(f"round {rnd} job {i}", images=[urls[i % 3 if rnd == 1 else 0]],
                                                   generation={"max_new_tokens": 16}) for i in range(JOBS))
        all_ids += ids
        _mid_run(client, ids)
        if rnd == 1:
            _busy(children)
        t0 = time.monotonic()
        os.killpg(worker.pid, signal.SIGTERM)  # the worker leads its group (tests/faults/procs.py)
        if rnd == 1:
            for child in children:
                child.kill()  # a child that dies mid-drain anyway
        worker.proc.wait(timeout=DRAIN_TIMEOUT_S + 60)
        exit_s = time.monotonic() - t0
        assert worker.returncode == 0, worker.tail()
        states = [client.jobs.state(j) for j in all_ids]
        failed = [j for j, s in zip(all_ids, states, strict=True) if s == "failed"]
        assert not failed, {j: client.status(j).error for j in failed}
        log = worker.tail(10**7)
        if rnd == 1:  # a child died holding a job during the drain: that job was handed back
            lost_in_hand = log.count("while the worker drained")
            assert lost_in_hand >= 1, log[-3000:]
        else:
            assert "preprocess_process.lost" not in log, log[-3000:]
        exits.append(exit_s)
        killed = f" (children SIGKILLed, {lost_in_hand} jobs in hand handed back)" if rnd == 1 else ""
        rows.append(f"round {rnd}: {states.count('succeeded')} succeeded, {len(failed)} failed, "
                    f"exit {exit_s:.1f} s{killed}")
        assert exit_s <= EXIT_LIMIT_S, rows
    last = spawn("group-last", **settings)
    last.wait_ready(redis_srv.url)
    final = wait_all(client, all_ids, timeout=180)
    states = [s.state.value for s in final.values()]
    assert states.count("succeeded") == len(all_ids), {j: (s.state.value, s.error) for j, s in final.items()
                                                        if s.state.value != "succeeded"}
    handed_back = sum(1 for j in all_ids if any(ev.get("retry_of") == "draining" for ev in client.jobs.events(j)))
    record(f"group sigterm: {ROUNDS} rounds x {JOBS} one-tile jobs, SIGTERM to the worker's process group mid-run; "
           f"{'; '.join(rows)}; after a new worker: {len(all_ids)} succeeded, 0 failed, {handed_back} handed back "
           f"uncounted; exits {', '.join(f'{e:.1f}' for e in exits)} s")
