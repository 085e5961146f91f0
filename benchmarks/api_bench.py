"""Jobs/s end to end through the HTTP API against the direct JobClient: same jobs, same worker.

Both submit every job of a mix at once and wait for all (the API's client waits
on each job's Server-Sent Events). The API runs in this process on a real
uvicorn, on loopback. Also counted: the Redis commands per job, from the
server's INFO commandstats, so the cost of progress snapshots shows.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any


@contextmanager
def serving_api(redis_url: str) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of an in-process API with one tenant whose limits do not bind."""
    import uvicorn

    from api_client.quotas import Limits
    from worker.embedded import free_port
    from worker.http_api import create_api
    from worker.tenants import Tenant, TenantRegistry, key_hash, new_key

    key, port = new_key(), free_port()
    limits = Limits(max_active=1_000_000, rate_per_s=1e6, burst=1_000_000)
    tenants = TenantRegistry.of({"bench": Tenant("bench", limits, ((key_hash(key), None),))})
    server = uvicorn.Server(uvicorn.Config(create_api(redis_url, tenants), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="bench-api", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
    with serving_api(service.redis.url) as (base, key), HttpJobClient(base, key) as http:
        _run(http, requests[:2], redis)  # the API's first requests off the clock
        pairs = [(_run(http, requests, redis), _run(service.client, requests, redis)) for _ in range(repeats)]
    api = max((p[0] for p in pairs), key=lambda r: r["jobs_per_s"])
    direct = max((p[1] for p in pairs), key=lambda r: r["jobs_per_s"])
    progress = getattr(service.runtime, "progress", None)
    return {"ratio": round(api["jobs_per_s"] / direct["jobs_per_s"], 3), "api": api, "direct": direct,
            "jobs": len(requests), "repeats": repeats,
            "progress_interval_s": service.settings.model_dump().get("progress_interval_s"),
            "progress_enabled": progress is not None}
