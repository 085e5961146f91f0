"""The control-plane bench's worker side: the instant engine, the stage probes, and `serve`.

`python -m benchmarks.control_plane serve [--instant]` runs this in the worker
subprocess (benchmarks/control_plane.py starts it, and reads the probes'
totals through its stdin): `internvl-queue worker` itself, with the probes
installed and, with --instant, the model's engine swapped for `InstantEngine`.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any


class InstantEngine:
    """A StepEngine (worker/model/steploop.py) that finishes every request at its next step.

    Each request gets max_new_tokens copies of one token, and cancel and
    deadline still end a request as the real engine does."""

    def __init__(self, token_id: int = 0, text: str = "ok") -> None:
        self._waiting: list[Any] = []
        self.token_id, self.text = token_id, text
        self.steps = 0

    def add(self, item: Any) -> None:
        self._waiting.append(item)

    def has_work(self) -> bool:
        return bool(self._waiting)

    def take_waiting(self) -> list[Any]:
        waiting, self._waiting = self._waiting, []
        return waiting

    def abort(self, error: BaseException) -> list[tuple[Any, Any]]:
        return [(item, error) for item in self.take_waiting()]

    def step(self) -> list[tuple[Any, Any]]:
        from model_runtime.types import DeadlineExceeded, Output, RequestCancelled

        self.steps += 1
        batch, now = self.take_waiting(), time.monotonic()
        finished: list[tuple[Any, Any]] = []
        for p in batch:
            if p.cancelled is not None and p.cancelled():
                finished.append((p, RequestCancelled(p.request_id)))
            elif p.deadline is not None and now >= p.deadline:
                finished.append((p, DeadlineExceeded(p.request_id)))
            else:
                n = p.sampling.max_new_tokens
                finished.append((p, Output(request_id=p.request_id, text=self.text * n, finish_reason="length",
                                           prompt_tokens=p.prompt_tokens, completion_tokens=n, generate_ms=0.0,
                                           batch_size=len(batch), padding_tokens=0, token_ids=[self.token_id] * n)))
        return finished


def install_instant_engine(runtime: Any) -> None:
    """Replace the worker's model thread with a StepLoop over an InstantEngine (before it takes a job)."""
    from worker.model.steploop import StepLoop
    from worker.model.thread import BatchOutcome, ModelThread

    runtime.model_thread.stop(timeout=10)
    engine = InstantEngine()

    def outcome(_item: Any, output: Any, info: Any) -> BatchOutcome:
        return BatchOutcome(output, f"instant:run{info.run}", output.batch_size, 0.0)

    loop = StepLoop(engine, on_loop=runtime.health.batch_heartbeat, wrap=outcome, name="model-thread").start()
    runtime.model_thread = ModelThread(engine, loop)  # type: ignore[arg-type]
    runtime.ctx = replace(runtime.ctx, queue=loop)


STAGES = ("fetch", "decode", "processor", "handoff", "state", "result_write", "events")


class StageProbes:
    """CPU seconds of the calling thread inside each stage's calls, summed over the worker's threads."""

    def __init__(self, runtime: Any = None) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self.cpu_s: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def probed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.thread_time() - started
                with self._lock:
                    self.cpu_s[stage] += spent
                    self.calls[stage] += 1

        setattr(owner, name, probed)

    def install(self) -> None:
        import model_runtime.media
        import model_runtime.prompts
        import worker.celery_app
        from api_client.dispatch import Dispatcher
        from api_client.jobstate import JobStore
        from worker.io.media_fetch import MediaFetcher
        from worker.io.results_store import FileStore
        from worker.jobs.prep_pool import PrepPool

        self.wrap(MediaFetcher, "get_bytes", "fetch")
        self.wrap(model_runtime.media, "decode_image", "decode")
        self.wrap(model_runtime.media, "decode_video", "decode")
        self.wrap(model_runtime.prompts, "prepare", "processor")
        self.wrap(JobStore, "run", "state")
        self.wrap(JobStore, "lost", "state")
        self.wrap(FileStore, "put_json", "result_write")
        self.wrap(Dispatcher, "announce", "events")
        self.wrap(worker.celery_app, "process_job", "process_job")
        self.wrap(PrepPool, "prepare", "handoff")  # in this process: borrow a child, send, map the tensors

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stages = dict(self.cpu_s)
        prep = getattr(self.runtime, "prep", None)
        if prep is not None:  # fetch, decode and the processor ran in the preprocessing processes
            for stage, seconds in prep.stats.cpu_s.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
        return {"stages_cpu_s": stages, "threads_cpu_s": thread_cpu()}


def thread_group(name: str) -> str:
    if name == "MainThread":
        return "celery_consumer"
    if name.startswith("ThreadPoolExecutor"):
        return "task_threads"
    if name == "model-thread":
        return "model_thread"
    return "other"


def thread_cpu() -> dict[str, float]:
    """CPU seconds by thread group, read from /proc by native thread id (live threads only)."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    groups: dict[str, float] = defaultdict(float)
    for t in psutil.Process().threads():
        groups[thread_group(names.get(t.id, "?"))] += t.user_time + t.system_time
    return dict(groups)


def _control_loop(probes: StageProbes) -> None:
    """Lines on stdin: `snapshot PATH` writes the probes' totals to PATH as JSON."""
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        if verb == "snapshot":
            tmp = Path(arg + ".tmp")
            tmp.write_text(json.dumps(probes.snapshot()))
            tmp.replace(arg)


def serve(instant: bool) -> int:
    """The worker subprocess: `internvl-queue worker` with the probes (and the instant engine)."""
    from worker.cli.service import serve_worker
    from worker.settings import Settings

    def started(runtime: Any) -> None:
        if instant:
            install_instant_engine(runtime)
        probes = StageProbes(runtime)
        probes.install()
        threading.Thread(target=_control_loop, args=(probes,), name="bench-control", daemon=True).start()

    return serve_worker(Settings(), on_started=started)
