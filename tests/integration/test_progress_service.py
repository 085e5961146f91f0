"""Live progress end to end: JobClient.stream -> redis-server -> Celery worker (threads pool, continuous
engine, tiny InternVL) -> progress publisher -> the job record and its channel.

The tiny model's text is gibberish by design (replacement characters
included): the assertions are that the streamed pieces add up to the final
text, that the record's progress grows while the job runs, and that broken
progress never fails a job. Jobs decode 200 tokens (min_new_tokens pins the
length) and the worker reports every 10 ms, so a job shows several snapshots.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import pytest
import redis

from api_client import JobClient, JobRequest
from api_client.jobstate import Claim, JobStore
from tests.harness import running_worker
from worker.jobs.progress import ProgressPublisher
from worker.settings import Settings

LONG = {"max_new_tokens": 200, "min_new_tokens": 200}


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ivq-progress")
    settings = Settings(
        redis_url=redis_url, data_dir=data_dir, model="tiny", model_cache_dir=data_dir.parent / "models-cache",
        max_batch_size=4, concurrency=8, lease_s=20, cancel_poll_s=0.2, progress_interval_s=0.01,
    )
    with running_worker(settings) as runtime:
        yield {"settings": settings, "runtime": runtime}


@pytest.fixture
def client(redis_url, service):
    c = JobClient(redis_url)
    yield c
    c.close()


def submit(client: JobClient, prompt: str, **generation) -> str:
    return client.submit(JobRequest.simple(prompt, generation={**LONG, **generation}))


def follow(client: JobClient, job_id: str) -> tuple[list[str], list[int]]:
    """The stream's pieces, and the completion tokens the record showed as they came."""
    pieces, tokens = [], []
    for piece in client.stream(job_id, timeout=120):
        pieces.append(piece)
        status = client.status(job_id)
        if status.progress is not None:
            tokens.append(status.progress.completion_tokens)
    return pieces, tokens


def test_the_streamed_pieces_add_up_to_the_final_text_and_progress_grows(service, client):
    job_id = submit(client, "Tell a long story about the sea.")
    pieces, tokens = follow(client, job_id)
    result = client.result(job_id)
    assert client.status(job_id).state.value == "succeeded" and result is not None
    assert result.usage.completion_tokens == 200
    assert "".join(pieces) == result.output_text
    assert len(pieces) >= 3 and all(pieces), pieces
    assert len(set(tokens)) >= 2 and tokens == sorted(tokens) and max(tokens) < 200, tokens
    assert client.status(job_id).progress is None  # only while it runs


def test_with_a_stop_string_the_stream_ends_where_the_final_text_is_cut(service, client):
    prompt = "Tell another story."
    plain = submit(client, prompt)
    client.wait(plain, timeout=120)
    full = client.result(plain).output_text
    stop = next(s for k in range(len(full) // 2, len(full) - 3)
                if (s := full[k : k + 3]).isascii() and s.isprintable() and full.index(s) > len(full) // 3)
    job_id = submit(client, prompt, stop=[stop])  # greedy: the same tokens, cut before the stop
    pieces, _ = follow(client, job_id)
    result = client.result(job_id)
    assert result is not None and result.finish_reason == "stop"
    assert result.output_text == full[: full.index(stop)]
    assert "".join(pieces) == result.output_text and len(pieces) >= 2, pieces


class RaisingHooks(ProgressPublisher):
    """A publisher whose hook raises on the model thread."""

    def hook(self, claim: Claim, stops: tuple[str, ...]) -> Callable[[Sequence[int]], None]:
        def on_progress(ids: Sequence[int]) -> None:
            raise RuntimeError("progress hook broke")

        return on_progress


def test_progress_that_cannot_be_written_or_whose_hook_raises_does_not_fail_the_job(service, client):
    runtime = service["runtime"]
    ctx = runtime.ctx
    tokenizer = ctx.loaded.processor.tokenizer
    unreachable = JobStore(redis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5))  # nobody there
    broken = ProgressPublisher(unreachable, tokenizer).start()
    raising = RaisingHooks(ctx.jobs, tokenizer)
    try:
        for publisher in (broken, raising):
            runtime.ctx = dataclasses.replace(ctx, progress=publisher)
            job_id = submit(client, "Describe a storm.")
            pieces, _ = follow(client, job_id)
            result = client.result(job_id)
            assert client.status(job_id).state.value == "succeeded" and result is not None
            assert result.usage.completion_tokens == 200 and "".join(pieces) == result.output_text
        assert broken.failed >= 2 and broken.published == 0 and broken.alive
    finally:
        runtime.ctx = ctx
        broken.stop()


def test_wait_follow_prints_the_text_as_it_grows_then_the_status(service, client, redis_url):
    job_id = submit(client, "One more, please.")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "wait", job_id, "--follow", "--timeout", "120",
                           "--redis-url", redis_url], capture_output=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    text = client.result(job_id).output_text
    assert done.stdout.decode().startswith(f"{text}\n{job_id}  succeeded")


def _commands(r: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in r.info("commandstats").items()}


def test_measure_the_redis_commands_progress_adds_per_job(service, client, redis_url):
    """A measurement, printed (pytest -s), not asserted: what progress costs Redis per job, at the
    default interval (0.25 s). Each snapshot is one round trip (EVALSHA of progress.lua) running
    HMGET, HSET and PUBLISH; a streaming client adds one HMGET per snapshot."""
    runtime = service["runtime"]
    ctx, engine = runtime.ctx, runtime.model_thread.engine
    r = redis.Redis.from_url(redis_url)
    jobs, generation = 8, {"max_new_tokens": 400, "min_new_tokens": 400}
    interval = engine.progress_interval_s
    engine.progress_interval_s = 0.25
    runs = {}
    try:
        for label, progress in (("off", None), ("on", ProgressPublisher(ctx.jobs, ctx.loaded.processor.tokenizer))):
            runtime.ctx = dataclasses.replace(ctx, progress=progress.start() if progress else None)
            before, started = _commands(r), time.perf_counter()
            ids = [submit(client, f"Measure {label} {i}.", **generation) for i in range(jobs)]
            assert all(client.wait(j, timeout=300).state.value == "succeeded" for j in ids)
            after, seconds = _commands(r), time.perf_counter() - started
            runs[label] = ({k: after[k] - before.get(k, 0) for k in after}, seconds, progress)
            if progress:
                progress.stop()
    finally:
        runtime.ctx = ctx
        engine.progress_interval_s = interval
    (off, off_s, _), (on, on_s, publisher) = runs["off"], runs["on"]
    extra = {k: (on.get(k, 0) - off.get(k, 0)) / jobs for k in sorted(set(on) | set(off))}
    print(f"\nprogress off: {sum(off.values()) / jobs:.1f} commands/job ({off_s:.1f}s for {jobs} jobs); "
          f"on: {sum(on.values()) / jobs:.1f} commands/job ({on_s:.1f}s); "
          f"snapshots written: {publisher.published / jobs:.1f}/job; "
          f"difference by command: { {k: round(v, 1) for k, v in extra.items() if abs(v) >= 0.5} }")
