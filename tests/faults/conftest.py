"""Fixtures for the fault suite: the tiny model built once, a Redis per test, worker factories.

Every test here starts its own redis-server (so it can be restarted or
filled without disturbing other tests) and its workers as subprocesses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api_client import JobClient
from tests.faults.common import FIGURES
from tests.faults.procs import WorkerProc, worker_env
from worker.ops.embedded import EmbeddedRedis




def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("fault suite figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Build the tiny checkpoint once, so worker subprocesses only load it."""
    from model_runtime.tiny import ensure_tiny

    cache = tmp_path_factory.mktemp("fault-models")
    ensure_tiny(cache)
    return cache


@pytest.fixture
def redis_srv(tmp_path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True)
    yield server
    server.stop()


@pytest.fixture
def client(redis_srv) -> Iterator[JobClient]:
    c = JobClient(redis_srv.url)
    yield c
    c.close()


@pytest.fixture
def spawn(redis_srv, model_cache, tmp_path) -> Iterator[Callable[..., WorkerProc]]:
    """spawn(worker_id, **ivq_settings) -> a started WorkerProc (not yet ready); all stopped at the end."""
    procs: list[WorkerProc] = []

    def _spawn(worker_id: str, **ivq: object) -> WorkerProc:
        env = worker_env(redis_url=redis_srv.url, data_dir=tmp_path / "data", model_cache_dir=model_cache, **ivq)
        proc = WorkerProc(env, tmp_path / "logs", worker_id).start()
        procs.append(proc)
        return proc

    yield _spawn
    for p in procs:
        p.stop()
