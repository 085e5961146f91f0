"""A preprocessing process: `python -m worker.jobs.prep_child`, started by worker/jobs/prep_pool.py.

It loads the processor (not the model), then answers one job at a time over
its stdin/stdout as JSON lines, so nothing is pickled:

    in:  {"settings": {...}, "model_path": ..., "cache_dir": ..., "owner_pid": ...}  (once)
    out: {"ready": true, "pid": ...}
    in:  {"seq": n, "job_id": ..., "request": "<the request JSON>", "context_length": ...}
    out: {"seq": n, "ok": true, "tensors": <worker/model/handoff.py layout>, "prompt_tokens": ..., ...}
     or  {"seq": n, "ok": false, "code": ..., "message": ..., "retryable": ...}

Fetch, decode and the processor run here (worker/jobs/inputs.py); tensors go
back through shared memory. A failure of the job's own (bad media, a missing
object) is classified here by worker/jobs/errors.py and travels as its code;
the process itself ends only when its stdin closes (the worker is gone) or it
dies, which the pool sees and answers for the job it held.

Shutdown is the worker's: SIGTERM and SIGINT are ignored here (the pool starts
this process in a group of its own, so a signal to the worker's group misses it
anyway), and a worker that died while this process prepared a job is noticed
within a second (its parent changes), and this process exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any, BinaryIO

from api_client.schema import JobRequest


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _exit_with_parent(os.getppid())
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    proto_out: BinaryIO = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer
    first = proto_in.readline()
    if not first:
        return 0
    env, owner_pid = _env(json.loads(first))
    _send(proto_out, {"ready": True, "pid": os.getpid()})
    for line in proto_in:
        message = json.loads(line)
        _send(proto_out, handle(env, owner_pid, message))
    # stdin closed: the worker is stopping and waits for this exit. Every reply went out (flushed
    # per line); skip the interpreter's teardown of torch and the processor (a second or more).
    sys.stderr.flush()
    os._exit(0)


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Exit once the worker that started this process is gone (its stdin closes too, but only
    the next read sees that, after the job in hand)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _env(config: dict[str, Any]) -> tuple[Any, int]:
    from model_runtime.loading import load_processor
    from worker.io.media_fetch import MediaFetcher
    from worker.jobs.inputs import InputEnv
    from worker.ops.logs import configure_logging
    from worker.settings import Settings

    settings = Settings.model_validate(config["settings"])
    configure_logging(settings.log_level, stream=sys.stderr, static={"worker": settings.resolved_worker_id,
                                                                     "process": "preprocess"})
    media = MediaFetcher(allowed_file_root=settings.resolved_file_root, s3_allowed_buckets=settings.s3_allowed_buckets,
                         s3_endpoint_url=settings.s3_endpoint_url)
    processor = load_processor(config["model_path"], cache_dir=config.get("cache_dir"))
    env = InputEnv(settings=settings, media=media, processor=processor, media_limits=settings.media_limits(),
                   context_length=None)
    return env, int(config["owner_pid"])


def handle(env: Any, owner_pid: int, message: dict[str, Any]) -> dict[str, Any]:
    """One job: its inputs into shared memory, or its error as (code, message, retryable)."""
    from worker.jobs.errors import Action, classify
    from worker.jobs.inputs import StageCpu, prepare_inputs
    from worker.model.handoff import handoff_name, write_tensors

    seq, job_id = int(message["seq"]), str(message["job_id"])
    started, cpu = time.perf_counter(), StageCpu()
    try:
        request = JobRequest.model_validate_json(message["request"])
        prepared = prepare_inputs(replace(env, context_length=message.get("context_length")), job_id, request, cpu)
        layout = write_tensors(handoff_name(owner_pid, os.getpid(), seq),
                               {"input_ids": prepared.input_ids, "pixel_values": prepared.pixel_values})
    except Exception as exc:  # noqa: BLE001 - every error of this job goes back to it, classified
        c = classify(exc)
        return {"seq": seq, "ok": False, "code": c.code.value, "message": c.message,
                "retryable": c.action is Action.RETRY, "cpu_ms": cpu.as_ms()}
    return {"seq": seq, "ok": True, "tensors": layout, "prompt_tokens": prepared.prompt_tokens,
            "image_tiles": prepared.image_tiles, "video_frames": prepared.video_frames, "cost": prepared.cost,
            "tile_keys": None if prepared.tile_keys is None else [key.hex() for key in prepared.tile_keys],
            "preprocess_ms": (time.perf_counter() - started) * 1000.0, "cpu_ms": cpu.as_ms()}


def _send(out: BinaryIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
