"""Every tenant is bounded: batch quotas and rates refused with 429 and nothing created, safe
defaults for a tenant with no limits, capped event streams that share one pub/sub connection,
and a batch status whose Redis commands do not grow with the batch. Real uvicorn and
redis-server; no worker (the jobs stay queued, which is what these limits are about)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest

from api_client import JobClient, JobRequest, keys
from api_client.quotas import Limits
from tests.integration.test_jobstate import _monitor
from worker.http.app import create_api
from worker.http.batch_routes import BatchRoutes
from worker.http.batch_store import Batches, check_lines
from worker.http.tenants import Tenant, TenantRegistry, default_limits, key_hash, new_key, redis_memory_bytes
from worker.io.results_store import open_store
from worker.ops.embedded import serve_in_thread

KEYS = {name: new_key() for name in ("small", "slow", "streams", "many", "status")}
LIMITS = {
    "small": Limits(max_batch_jobs=50),
    "slow": Limits(batch_rate_per_s=0.1, batch_burst=2),
    "streams": Limits(max_streams=3),
    "many": Limits(max_streams=1000),
    "status": Limits(),
}


def _registry(limits: dict[str, Limits]) -> TenantRegistry:
    return TenantRegistry.of({name: Tenant(name, limit, ((key_hash(KEYS.get(name) or ""), None),))
                              for name, limit in limits.items()})


def _lines(n: int, text: str = "describe") -> str:
    request = JobRequest.simple(text, generation={"max_new_tokens": 2}).model_dump(mode="json")
    return "".join(json.dumps({"custom_id": f"c-{i}", "request": request}) + "\n" for i in range(n))


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> BatchRoutes:
    return BatchRoutes(open_store(f"file://{tmp_path_factory.mktemp('store')}"), max_body_bytes=64 << 20)


@pytest.fixture(scope="module")
def api(redis_url, routes):
    with serve_in_thread(create_api(redis_url, _registry(LIMITS), batches=routes)) as base:
        yield base


def _http(base: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def _post_batch(http: httpx.Client, body: str) -> httpx.Response:
    return http.post("/v1/native/batches", content=body, headers={"Content-Type": "application/jsonl"})


def _snapshot(r) -> dict[str, object]:
    """Every key with its type and size: a refused submit must leave this unchanged."""
    out: dict[str, object] = {}
    for k in r.scan_iter(count=1000):
        kind = r.type(k).decode()
        size = {"hash": r.hgetall, "list": r.llen, "zset": r.zcard, "string": r.get, "set": r.scard}[kind](k)
        out[k.decode()] = (kind, size)
    return out


def _open_fds() -> int:
    """Open files of this process (the API runs in it) that are unlinked temporary files: spools."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
        except OSError:
            pass
    return found


def test_a_batch_over_the_quota_is_refused_and_creates_nothing(api, redis_client, redis_url):
    with _http(api, "small") as http:
        first = _post_batch(http, _lines(40))
        assert first.status_code == 202, first.text
        before, fds = _snapshot(redis_client), _open_fds()
        refused = _post_batch(http, _lines(20))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        assert int(refused.headers["Retry-After"]) >= 1
        assert _snapshot(redis_client) == before  # no record, no job, no backlog entry, no token taken
        assert _open_fds() == fds  # the spooled body is gone
        # The first batch's jobs end (cancelled here): its holding goes, and the next batch fits.
        with JobClient(redis_url) as direct:
            for row in redis_client.lrange(keys.BatchKeys.of(first.json()["batch_id"]).jobs, 0, -1):
                direct.cancel(row.decode().split("\t")[1])
        assert _post_batch(http, _lines(20)).status_code == 202
        scraped = http.get("/metrics").text
    assert 'ivq_api_refusals_total{kind="batch",reason="quota_exceeded",tenant="small"} 1.0' in scraped
    assert 'ivq_tenant_batch_held_jobs{tenant="small"} 20.0' in scraped


def test_batch_submits_are_rate_limited(api, redis_client):
    with _http(api, "slow") as http:
        assert [_post_batch(http, _lines(2)).status_code for _ in range(2)] == [202, 202]
        before = _snapshot(redis_client)
        refused = _post_batch(http, _lines(2))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 5
        assert _snapshot(redis_client) == before


def test_a_tenant_without_limits_holds_at_most_its_share_of_redis(redis_url, redis_client, routes, tmp_path):
    redis_client.config_set("maxmemory", 100 << 20)
    try:
        defaults = default_limits(redis_memory_bytes(redis_client, None), share=0.01)  # 1 MiB of batches
        keys_file = tmp_path / "keys.json"
        keys_file.write_text(json.dumps({"tenants": {"plain": {"keys": [{"sha256": key_hash(KEYS["status"])}]}}}))
        registry = TenantRegistry(keys_file, defaults=defaults)
        with serve_in_thread(create_api(redis_url, registry, batches=routes)) as base, _http(base, "status") as http:
            assert registry.authenticate(f"Bearer {KEYS['status']}").limits.max_batch_bytes == (100 << 20) // 100
            too_big = _post_batch(http, _lines(1000))  # ~1,000 x (request + overhead) > 1 MiB
            assert too_big.status_code == 429 and too_big.json()["error"]["code"] == "quota_exceeded"
            assert _post_batch(http, _lines(100)).status_code == 202
    finally:
        redis_client.config_set("maxmemory", 0)


def _job(redis_url: str, tenant: str, n: int = 1) -> list[str]:
    with JobClient(redis_url) as direct:
        return [direct.submit(JobRequest.simple("wait"), tenant=tenant) for _ in range(n)]


def test_event_streams_are_capped_per_tenant(api, redis_url, redis_client):
    job_id = _job(redis_url, "streams")[0]
    headers = {"Authorization": f"Bearer {KEYS['streams']}"}
    with httpx.Client(base_url=api, timeout=30, headers=headers) as http:
        opened = [http.stream("GET", f"/v1/jobs/{job_id}/events") for _ in range(3)]
        responses = [s.__enter__() for s in opened]
        assert [r.status_code for r in responses] == [200, 200, 200]
        fourth = http.get(f"/v1/jobs/{job_id}/events")
        assert fourth.status_code == 429 and fourth.json()["error"]["code"] == "quota_exceeded"
        assert "Retry-After" in fourth.headers
        opened[0].__exit__(None, None, None)
        deadline = time.monotonic() + 10
        while redis_client.zcard(keys.TenantKeys.of("streams").streams) > 2:  # the closed stream gave its place back
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as again:
            assert again.status_code == 200
        for s in opened[1:]:
            s.__exit__(None, None, None)


def _clients(r) -> int:
    return len(r.client_list())


async def _open_streams(base: str, job_ids: list[str], opened: asyncio.Event, release: asyncio.Event) -> list[int]:
    limits = httpx.Limits(max_connections=len(job_ids) + 10)
    headers = {"Authorization": f"Bearer {KEYS['many']}"}
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits, headers=headers) as http:
        first_events = 0
        lock = asyncio.Lock()

        async def one(job_id: str) -> int:
            nonlocal first_events
            async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                async for chunk in response.aiter_text():
                    if "event: state" in chunk:
                        async with lock:
                            first_events += 1
                            if first_events == len(job_ids):
                                opened.set()
                        break
                await release.wait()
                return response.status_code

        return list(await asyncio.gather(*(one(j) for j in job_ids)))


def test_500_streams_share_a_bounded_number_of_redis_connections(redis_url, redis_client, routes):
    streams, pool = 500, 16
    job_ids = _job(redis_url, "many", streams)
    baseline = _clients(redis_client)
    with serve_in_thread(create_api(redis_url, _registry(LIMITS), batches=routes, redis_connections=pool)) as base:
        loop = asyncio.new_event_loop()
        opened, release = asyncio.Event(), asyncio.Event()
        holder: dict[str, object] = {}
        runner = threading.Thread(target=lambda: holder.setdefault(
            "codes", loop.run_until_complete(_open_streams(base, job_ids, opened, release))))
        runner.start()
        deadline = time.monotonic() + 180
        while not opened.is_set():
            assert runner.is_alive() and time.monotonic() < deadline, holder
            time.sleep(0.1)
        used = _clients(redis_client) - baseline
        pubsub = sum(1 for c in redis_client.client_list() if int(c.get("sub", 0)) > 0)
        loop.call_soon_threadsafe(release.set)
        runner.join(timeout=120)
        loop.close()
    print(f"streams: {streams} open on one API process used {used} Redis connections "
          f"({pubsub} pub/sub, the streams' pool capped at {pool}, the rest the sync client's)")
    assert holder["codes"] == [200] * streams
    assert pubsub == 1
    assert used <= pool + 1 + 40  # the pool, the pub/sub, and at most one per threadpool worker (anyio: 40)


def test_batch_status_costs_the_same_commands_for_10_and_10000_lines(api, redis_url, redis_server, redis_client):
    batches = Batches(redis_client, JobClient(redis_url))
    small = batches.create("status", check_lines(_lines(10).splitlines()), callback=None)
    big = batches.create("status", check_lines(_lines(10_000).splitlines()), callback=None)
    costs = {}
    with _http(api, "status") as http:
        http.get(f"/v1/native/batches/{small}")  # warm: the script cache, the connections
        for name, batch_id in (("10", small), ("10000", big)):
            lines: list[str] = []
            stop = threading.Event()
            watcher = threading.Thread(target=_monitor, args=(redis_server.port, stop, lines))
            watcher.start()
            time.sleep(0.2)
            status = http.get(f"/v1/native/batches/{batch_id}").json()
            time.sleep(0.2)
            stop.set()
            watcher.join()
            commands = [line.split('"')[1].upper() for line in lines if '"' in line]
            costs[name] = commands
            assert status["counts"]["queued"] == int(name)
    print(f"batch status: {len(costs['10'])} Redis commands for 10 lines, {len(costs['10000'])} for 10,000 "
          f"({sorted(set(costs['10']))})")
    assert costs["10"] == costs["10000"]
