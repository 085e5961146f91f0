"""The preprocessing pool: processes that fetch, decode and run the processor, off the model process's GIL.

vLLM V1's split, in a Celery worker: the model process (Celery, the task
threads, the model thread) spends its GIL on the model loop; media decoding
and the HF processor run in `IVQ_PREPROCESS_WORKERS` child processes
(worker/jobs/prep_child.py), each preparing one job at a time, and tensors come
back through shared memory (worker/model/handoff.py). A task thread borrows an
idle child, sends it the job as one JSON line, waits (without the GIL) for the
reply line, maps the tensors and gives the child back.

A child that dies while it holds a job fails that job alone, with the stable
code `preprocess_crashed`, and is replaced in the background; one that overruns
the job's deadline is killed and replaced the same way and the job times out.
Either way the job ends through the pipeline's one error path, so it is never
lost or run twice. Once the worker drains (`begin_drain`), a job whose child
dies, or that has not reached a child yet, is handed back instead (`Draining`:
the engine admits nothing more anyway), and no child is replaced; the pipeline
also hands back a `preprocess_crashed` job that ends during a drain.
`IVQ_PREPROCESS_WORKERS=0` prepares on the task threads instead.

Shutdown is the parent's: a child runs in its own process group, so a signal
sent to the worker's group (systemd, supervisors, a terminal's Ctrl-C) does not
reach it, and it ignores SIGTERM and SIGINT sent to it directly (a cgroup-wide
stop). It ends when its stdin closes: `stop` closes it, and so does the
parent's death; a child whose parent died mid-job exits on its own
(worker/jobs/prep_child.py). SIGKILL still ends it at once.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from api_client.schema import ErrorCode, JobRequest
from worker.jobs.errors import Draining, JobFailed
from worker.jobs.translate import sampling_of
from worker.settings import Settings

if TYPE_CHECKING:
    from model_runtime.types import Prepared

log = structlog.get_logger(__name__)

CHILD_COMMAND = ("-m", "worker.jobs.prep_child")
CODE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds worker/
START_TIMEOUT_S = 300.0
RESPAWN_DELAY_S = (0.5, 10.0)  # first and longest wait between failed starts of a replacement


class PreprocessCrashed(JobFailed):
    """The preprocessing process died while it held this job (a decoder crash, the OOM killer)."""

    code = ErrorCode.preprocess_crashed


class ChildGone(Exception):
    """The child's pipe closed: it exited or was killed."""


class Child:
    """One preprocessing process and its two pipes; used by one task thread at a time."""

    def __init__(self, command: list[str], config: dict[str, Any], env: dict[str, str]) -> None:
        # cwd: `-m` puts the working directory first on the path; import the worker's own tree.
        # process_group=0: a group of its own (setpgid in the child, no preexec_fn), out of the worker's.
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=CODE_ROOT,
                                     process_group=0)
        self.seq = 0
        self.ready = False  # answered its first line: it reads stdin, so closing it ends the process
        self._send(config)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        reply = self._receive(timeout)
        if not reply.get("ready"):
            raise ChildGone(f"unexpected first line from the preprocessing process: {reply!r}")
        self.ready = True

    def send(self, message: dict[str, Any]) -> None:
        """Hand it one job; ChildGone if it is already dead (then the job never reached it)."""
        if self.proc.poll() is not None:
            raise ChildGone(f"exited with code {self.proc.returncode}")
        self.seq += 1
        self._send({**message, "seq": self.seq})

    def receive(self, timeout: float) -> dict[str, Any]:
        """The reply to the job sent last; ChildGone if it died holding it, TimeoutError if it overran."""
        reply = self._receive(timeout)
        if reply.get("seq") != self.seq:
            raise ChildGone(f"reply out of order: {reply.get('seq')} for {self.seq}")
        return reply

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:  # ValueError: the pipe was already closed
            raise ChildGone(str(exc)) from None

    def _receive(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        if not ready:
            raise TimeoutError(f"the preprocessing process did not answer within {timeout:.1f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise ChildGone("the preprocessing process closed its pipe")
        return json.loads(line)

    def exit_code(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close_pipes()

    def close(self, timeout: float) -> None:
        """Close stdin (the child exits after its current job), then kill it if it lingers."""
        self.close_stdin()
        self.finish(timeout)

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass

    def finish(self, timeout: float) -> None:
        """Wait for the exit that closing stdin asked for; kill it if it lingers."""
        if self.exit_code(timeout) is None:
            self.kill()
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe:
                    pipe.close()
            except OSError:
                pass


@dataclass
class PrepStats:
    """Totals over the pool's life, for metrics and the bench: CPU seconds per stage, in the children."""

    jobs: int = 0
    crashes: int = 0
    cpu_s: dict[str, float] = field(default_factory=lambda: {"fetch": 0.0, "decode": 0.0, "processor": 0.0})


class PrepPool:
    """`size` preprocessing processes; `prepare` is called from many task threads at once."""

    def __init__(self, settings: Settings, *, model_path: str, cache_dir: str | None, size: int,
                 command: list[str] | None = None) -> None:
        if size < 1:
            raise ValueError("a preprocessing pool needs at least one process")
        self.size = size
        self.command = command or [sys.executable, *CHILD_COMMAND]
        self.config = {"settings": _child_settings(settings), "model_path": model_path, "cache_dir": cache_dir,
                       "owner_pid": os.getpid()}
        self.context_length: int | None = None  # the loaded model's, sent with each job
        self.env = _child_env()
        self.stats = PrepStats()
        self._idle: queue.Queue[Child] = queue.Queue()
        self._children: set[Child] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._draining = threading.Event()  # the worker is stopping: no new job, no replacement
        self._starting: list[Child] = []

    # ---- lifecycle -----------------------------------------------------
    def start(self) -> PrepPool:
        """Start every child (they load in parallel); `wait_ready` blocks until all answered."""
        from worker.model.handoff import remove_stale

        remove_stale()  # handoff files of model processes that died before reading them
        self._starting = [self._spawn() for _ in range(self.size)]
        return self

    def wait_ready(self, *, context_length: int | None, timeout: float = START_TIMEOUT_S) -> PrepPool:
        self.context_length = context_length
        deadline = time.monotonic() + timeout
        for child in self._starting:
            child.wait_ready(deadline - time.monotonic())
            self._idle.put(child)
        self._starting = []
        log.info("preprocess_pool.ready", processes=self.size, pids=[c.pid for c in self._children])
        return self

    def begin_drain(self) -> None:
        """The worker drains: a job not yet handed to a process goes back (`Draining`: the engine takes
        no new job now), and a process that dies is not replaced. Jobs in hand finish."""
        self._draining.set()

    def stop(self, timeout: float = 10.0) -> None:
        from worker.model.handoff import remove_stale

        self._closed.set()
        with self._lock:
            children = list(self._children)
            self._children.clear()
        for child in children:  # all at once: each ends after the job it holds
            child.close_stdin()
        deadline = time.monotonic() + timeout
        for child in children:  # one still loading reads no stdin yet: killed without a wait
            child.finish(max(0.0, deadline - time.monotonic()) if child.ready else 0.0)
        remove_stale(os.getpid())

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [c.pid for c in self._children]

    def _spawn(self) -> Child:
        child = Child(self.command, self.config, self.env)
        with self._lock:
            self._children.add(child)
        return child

    # ---- one job -------------------------------------------------------
    def prepare(self, job_id: str, request_json: str, request: JobRequest, *, deadline: float) -> Prepared:
        """The job's Prepared, its tensors viewed in shared memory; raises the job's own error."""
        from model_runtime.types import Prepared
        from worker.model.handoff import read_tensors

        while True:
            child = self._borrow(deadline)
            try:
                child.send({"job_id": job_id, "request": request_json, "context_length": self.context_length})
                break
            except ChildGone:  # it died while idle: the job never reached it, so another child takes it
                self._lost(child, None)
        try:
            reply = child.receive(deadline - time.monotonic())
        except ChildGone:
            self._lost(child, job_id)
            if self._closed.is_set() or self._draining.is_set():  # the worker is going away: not the job's fault
                raise Draining(f"the preprocessing process (pid {child.pid}) died while the worker drained") from None
            raise PreprocessCrashed(f"the preprocessing process (pid {child.pid}) died while preparing this job "
                                    f"(exit code {child.proc.returncode})") from None
        except TimeoutError:
            self._lost(child, job_id)
            raise
        self._idle.put(child)
        self._count(reply)
        if not reply["ok"]:
            raise JobFailed(reply["message"], code=reply["code"], retryable=reply["retryable"])
        tensors = read_tensors(reply["tensors"])
        return Prepared(
            request_id=job_id, input_ids=tensors["input_ids"], pixel_values=tensors.get("pixel_values"),
            sampling=sampling_of(request.generation), prompt_tokens=int(reply["prompt_tokens"]),
            image_tiles=int(reply["image_tiles"]), video_frames=int(reply["video_frames"]), cost=float(reply["cost"]),
            tile_keys=None if reply.get("tile_keys") is None else tuple(bytes.fromhex(k) for k in reply["tile_keys"]),
            preprocess_ms=float(reply["preprocess_ms"]),
        )

    def _borrow(self, deadline: float) -> Child:
        while True:
            if self._closed.is_set() or self._draining.is_set():
                raise Draining("the preprocessing pool is stopping")
            try:
                return self._idle.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError("no preprocessing process came free before the job's deadline") from None

    def _count(self, reply: dict[str, Any]) -> None:
        with self._lock:
            self.stats.jobs += 1
            for stage, ms in reply.get("cpu_ms", {}).items():
                self.stats.cpu_s[stage] = self.stats.cpu_s.get(stage, 0.0) + ms / 1000.0

    def _lost(self, child: Child, job_id: str | None) -> None:
        """The child died or hung on this job: kill it, drop its handoff file, start a replacement."""
        from worker.model.handoff import discard, handoff_name

        child.kill()
        discard(handoff_name(os.getpid(), child.pid, child.seq))
        with self._lock:
            self._children.discard(child)
            self.stats.crashes += 1
        log.error("preprocess_process.lost", pid=child.pid, exit_code=child.proc.returncode, job_id=job_id)
        threading.Thread(target=self._replace, name="preprocess-respawn", daemon=True).start()

    def _replace(self) -> None:
        delay = RESPAWN_DELAY_S[0]
        while not self._closed.is_set() and not self._draining.is_set():
            child = None
            try:
                child = self._spawn()
                child.wait_ready(START_TIMEOUT_S)
            except (ChildGone, TimeoutError, OSError) as exc:
                log.error("preprocess_process.start_failed", error=str(exc), retry_in_s=delay)
                if child is not None:
                    with self._lock:
                        self._children.discard(child)
                    child.kill()
                self._closed.wait(delay)
                delay = min(RESPAWN_DELAY_S[1], delay * 2)
                continue
            if self._closed.is_set() or self._draining.is_set():
                child.close(1.0)
                return
            log.info("preprocess_process.replaced", pid=child.pid)
            self._idle.put(child)
            return


def _child_settings(settings: Settings) -> dict[str, Any]:
    """The settings a child needs (storage, limits, tiles), as JSON; secrets stay in the model process."""
    names = ("data_dir", "store_url", "s3_endpoint_url", "s3_allowed_buckets", "allowed_file_root",
             "allow_https_media", "callback_allow_private", "max_image_bytes", "max_image_pixels", "max_video_bytes",
             "max_video_seconds", "max_video_pixels", "max_video_frames", "default_video_frames", "max_frame_side",
             "max_tiles", "log_level", "worker_id")
    values = settings.model_dump(mode="json", include=set(names))
    values["store_url"] = settings.resolved_store_url
    values["allowed_file_root"] = None if settings.resolved_file_root is None else str(settings.resolved_file_root)
    values["worker_id"] = settings.resolved_worker_id
    return values


def _child_env() -> dict[str, str]:
    """The worker's environment, with this tree first on the path and one torch thread per child."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CODE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # the pool's width is the parallelism; no thread oversubscription
    return env
