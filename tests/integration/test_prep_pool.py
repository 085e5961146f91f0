"""The preprocessing pool (worker/jobs/prep_pool.py) with real processes and the tiny model's processor.

Same inputs as on the task thread; one bad file fails its own job; a process
killed mid-job fails that job with `preprocess_crashed` and is replaced; one
that overruns the deadline is killed and the job times out. Shutdown is the
parent's: the processes run in their own process group and ignore SIGTERM and
SIGINT; once the worker drains, a job not yet in a process, or in one that dies,
goes back (`Draining`), and nothing is replaced; a process whose parent died exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from api_client.schema import ErrorCode, JobRequest
from model_runtime.samples import make_sample_image
from model_runtime.vision_cache import tile_keys
from worker.jobs.errors import Draining, JobFailed
from worker.jobs.inputs import InputEnv, prepare_inputs
from worker.jobs.prep_pool import PreprocessCrashed, PrepPool
from worker.io.media_fetch import MediaFetcher
from worker.model.handoff import PREFIX, shm_dir
from worker.settings import Settings

pytestmark = pytest.mark.timeout(180)
HANGING_CHILD = [sys.executable, "-m", "tests.faults.hanging_prep_child"]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep-media")
    (root / "photo.jpg").write_bytes(make_sample_image(160, 96, seed=3))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def pool(tiny_model_dir, media):
    pool = _pool(tiny_model_dir, media)
    yield pool
    pool.stop()


def _request(media: Path, text: str, image: str | None = "photo.jpg") -> JobRequest:
    images = [f"file://{media / image}"] if image else []
    return JobRequest.simple(text, images=images)


def _prepare(pool: PrepPool, job_id: str, request: JobRequest, timeout: float = 60):
    return pool.prepare(job_id, request.model_dump_json(), request, deadline=time.monotonic() + timeout)


def test_the_pool_prepares_what_the_task_thread_would(pool, media, tiny_runtime) -> None:
    request = _request(media, "What is this?")
    pooled = _prepare(pool, "job-a", request)
    env = InputEnv(settings=Settings(redis_url="redis://unused"), media=MediaFetcher(allowed_file_root=media),
                   processor=tiny_runtime.processor, media_limits=Settings().media_limits(), context_length=4096)
    local = prepare_inputs(env, "job-a", request)
    assert torch.equal(pooled.input_ids, local.input_ids)
    assert pooled.pixel_values is not None and torch.equal(pooled.pixel_values, local.pixel_values)
    assert (pooled.prompt_tokens, pooled.image_tiles, pooled.cost) == (local.prompt_tokens, local.image_tiles,
                                                                       local.cost)
    assert pooled.sampling == local.sampling
    # The vision cache's tile digests come from the preprocessing process, the same as computed here.
    assert pooled.tile_keys is not None and pooled.tile_keys == local.tile_keys == tile_keys(local.pixel_values)
    assert not list(shm_dir().glob(f"{PREFIX}{os.getpid()}-*"))  # read and unlinked


def test_one_bad_file_fails_its_own_job_with_its_code(pool, media) -> None:
    with pytest.raises(JobFailed) as failed:
        _prepare(pool, "job-bad", _request(media, "x", "broken.jpg"))
    assert failed.value.code is ErrorCode.invalid_media and not failed.value.retryable
    with pytest.raises(JobFailed) as outside:
        _prepare(pool, "job-outside", JobRequest.simple("x", images=["file:///etc/hostname"]))
    assert outside.value.code is ErrorCode.forbidden_url
    assert _prepare(pool, "job-next", _request(media, "fine")).image_tiles >= 1  # the same process goes on


def _hang_in_thread(pool: PrepPool, media: Path) -> tuple[threading.Thread, list[BaseException]]:
    """A job its process hangs on, prepared on a thread; returns once the process holds it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _prepare(pool, "job-hang", _request(media, "HANG", image=None))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)  # the job is in the child, which hangs on it
    return t, errors


def test_a_process_killed_mid_job_fails_that_job_only_and_is_replaced(pool, media) -> None:
    [victim] = pool.pids
    t, errors = _hang_in_thread(pool, media)
    os.kill(victim, signal.SIGKILL)
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], PreprocessCrashed), errors
    assert errors[0].code is ErrorCode.preprocess_crashed and not errors[0].retryable
    assert pool.stats.crashes == 1
    # The replacement takes the next job (it waits for the new process to load).
    assert _prepare(pool, "job-after", _request(media, "after")).prompt_tokens > 0
    assert pool.pids and victim not in pool.pids


def test_a_process_that_overruns_the_deadline_is_killed_and_the_job_times_out(pool, media) -> None:
    [hung] = pool.pids
    with pytest.raises(TimeoutError):
        _prepare(pool, "job-slow", _request(media, "HANG", image=None), timeout=1.0)
    assert _prepare(pool, "job-after-timeout", _request(media, "after")).prompt_tokens > 0
    assert hung not in pool.pids


def test_processes_leave_shutdown_to_their_parent(pool, media) -> None:
    [child] = pool.pids
    assert os.getpgid(child) == child != os.getpgid(0)  # a group of its own: a signal to ours misses it
    os.kill(child, signal.SIGTERM)  # and sent to it directly (a cgroup-wide stop), it is ignored
    os.kill(child, signal.SIGINT)
    time.sleep(0.5)
    assert pool.pids == [child] and _prepare(pool, "job-after-signals", _request(media, "still here")).prompt_tokens


def _pool(tiny_model_dir, media) -> PrepPool:
    settings = Settings(redis_url="redis://unused", allowed_file_root=media, data_dir=media)
    pool = PrepPool(settings, model_path=str(tiny_model_dir), cache_dir=None, size=1, command=HANGING_CHILD).start()
    return pool.wait_ready(context_length=4096)


def test_during_a_drain_a_job_whose_process_dies_goes_back_and_nothing_is_replaced(tiny_model_dir, media) -> None:
    pool = _pool(tiny_model_dir, media)
    try:
        [victim] = pool.pids
        t, errors = _hang_in_thread(pool, media)
        pool.begin_drain()
        os.kill(victim, signal.SIGKILL)
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], Draining), errors  # handed back, not failed
        with pytest.raises(Draining):  # a job that had not reached a process goes back too
            _prepare(pool, "job-late", _request(media, "late"))
        time.sleep(1.0)
        assert pool.pids == []  # no replacement for a worker that is going away
    finally:
        pool.stop()


def test_a_process_whose_worker_died_exits(tiny_model_dir, media, tmp_path) -> None:
    """The worker is SIGKILLed while its process hangs on a job: the process sees its parent go."""
    import subprocess

    script = tmp_path / "owner.py"
    script.write_text(f"""
import sys, time
from pathlib import Path
from api_client.schema import JobRequest
from worker.jobs.prep_pool import PrepPool
from worker.settings import Settings
media = Path({str(media)!r})
settings = Settings(redis_url="redis://unused", allowed_file_root=media, data_dir=media)
pool = PrepPool(settings, model_path={str(tiny_model_dir)!r}, cache_dir=None, size=1,
                command={HANGING_CHILD!r}).start().wait_ready(context_length=4096)
print(pool.pids[0], flush=True)
request = JobRequest.simple("HANG")
pool.prepare("job-hang", request.model_dump_json(), request, deadline=time.monotonic() + 600)
""")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[2])
    child = 0
    try:
        for line in owner.stdout:  # after its log lines, the pid of its process
            if line.strip().isdigit():
                child = int(line)
                break
        assert child, owner.stderr.read()[-3000:]
        time.sleep(1.0)  # the job is in the child, which hangs on it
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), "the process outlived its worker"
    finally:
        owner.kill()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    import psutil

    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
