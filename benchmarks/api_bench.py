"""Jobs/s end to end through the HTTP API against the direct JobClient: same jobs, same worker.

Both submit every job of a mix at once and wait for all (the API's client waits
on each job's Server-Sent Events). The API is `internvl-queue api` in its own
process, as deployed (in this process it would share the worker's GIL), on
loopback. Also counted: the Redis commands per job, from the server's INFO
commandstats, so the cost of the API and of progress snapshots shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def serving_api(redis_url: str, out_dir: Path) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of an `internvl-queue api` process with one tenant whose limits do not bind."""
    import httpx

    from worker.ops.embedded import free_port
    from worker.http.tenants import key_hash, new_key

    key, port = new_key(), free_port()
    keys_file = out_dir / "api-keys.json"
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    keys_file.write_text(json.dumps({"tenants": {"bench": {
        "keys": [{"sha256": key_hash(key)}], "max_active": 1_000_000, "rate_per_s": 1e6, "burst": 1_000_000}}}))
    env = {**os.environ, "IVQ_REDIS_URL": redis_url, "IVQ_API_KEYS_FILE": str(keys_file),
           "IVQ_STORE_URL": f"file://{out_dir / 'api-store'}", "IVQ_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "api", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (exit {proc.poll()})")
            time.sleep(0.1)
        yield base, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def serving_worker(redis_url: str, work: Path, **env_extra: str) -> Iterator[None]:
    """A worker process (`internvl-queue worker`, the tiny model), yielded once it has announced itself."""
    from api_client import JobClient, keys
    from model_runtime.tiny import ensure_tiny

    cache = work / "models"
    ensure_tiny(cache)
    env = {**os.environ, "IVQ_REDIS_URL": redis_url, "IVQ_MODEL": "tiny", "IVQ_MODEL_CACHE_DIR": str(cache),
           "IVQ_DATA_DIR": str(work / "data"), "IVQ_LOG_LEVEL": "WARNING", "IVQ_WORKER_ID": "bench-worker",
           **env_extra}
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        with JobClient(redis_url) as probe:
            deadline = time.monotonic() + 180
            while not probe.redis.hexists(keys.WORKERS, "bench-worker"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the worker did not start")
                time.sleep(0.2)
        yield
    finally:
        worker.terminate()
        worker.wait(timeout=90)


def _commands(redis: Any) -> int:
    return sum(int(v["calls"]) for k, v in redis.info("commandstats").items())


def _run(client: Any, requests: list, redis: Any) -> dict[str, Any]:
    before = _commands(redis)
    started = time.perf_counter()
    ids = client.submit_many(requests)
    statuses = [client.wait(job_id, timeout=1800) for job_id in ids]
    wall = time.perf_counter() - started
    failed = [s for s in statuses if s.state.value != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} bench jobs failed, first: {failed[0].error}")
    return {"jobs": len(ids), "seconds": round(wall, 4), "jobs_per_s": round(len(ids) / wall, 4),
            "redis_commands_per_job": round((_commands(redis) - before) / len(ids), 1)}


def bench_api_over_direct(service: Any, requests: list, repeats: int = 1) -> dict[str, Any]:
    from api_client import HttpJobClient

    redis = service.client.redis
    with serving_api(service.redis.url, service.config.out_dir / "api") as (base, key), \
            HttpJobClient(base, key) as http:
        _run(http, requests[:2], redis)  # the API's first requests off the clock
        pairs = [(_run(http, requests, redis), _run(service.client, requests, redis)) for _ in range(repeats)]
    api = max((p[0] for p in pairs), key=lambda r: r["jobs_per_s"])
    direct = max((p[1] for p in pairs), key=lambda r: r["jobs_per_s"])
    return {"ratio": round(api["jobs_per_s"] / direct["jobs_per_s"], 3), "api": api, "direct": direct,
            "jobs": len(requests), "repeats": repeats, "progress": _progress_cost(service, requests, redis)}


def _progress_cost(service: Any, requests: list, redis: Any) -> dict[str, Any]:
    """Redis commands per job with live progress on and off (the same jobs through JobClient)."""
    runtime = service.runtime
    publisher = runtime.ctx.progress
    if publisher is None:
        return {"enabled": False}
    published = publisher.published
    on = _run(service.client, requests, redis)
    snapshots = (publisher.published - published) / len(requests)
    runtime.ctx = dataclasses.replace(runtime.ctx, progress=None)  # the same worker without the hook
    try:
        off = _run(service.client, requests, redis)
    finally:
        runtime.ctx = dataclasses.replace(runtime.ctx, progress=publisher)
    return {"enabled": True, "interval_s": service.settings.progress_interval_s,
            "snapshots_per_job": round(snapshots, 2), "commands_per_job_on": on["redis_commands_per_job"],
            "commands_per_job_off": off["redis_commands_per_job"],
            "commands_added_per_job": round(on["redis_commands_per_job"] - off["redis_commands_per_job"], 1)}
