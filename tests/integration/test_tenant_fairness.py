"""Batches take turns across tenants, and a tenant's flood of batches does not slow another
tenant's interactive jobs. Real uvicorn, redis-server and an in-process worker (tiny model at
one new token: the scheduling, not the model, is what is measured; text is gibberish).

The issue's full-size case (2,000 lines against 20) is benchmarks/tenant_fairness.py; here the
same property at a size the suite can afford.
"""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

from api_client import HttpJobClient, JobRequest
from api_client.errors import QuotaExceeded, RateLimited
from api_client.quotas import Limits, Quotas
from tests.harness import running_worker
from worker.http.app import create_api
from worker.http.batch_routes import BatchRoutes
from worker.http.batch_store import Batches
from worker.http.tenants import Tenant, TenantRegistry, key_hash, new_key
from worker.io.results_store import open_store
from worker.ops.embedded import serve_in_thread
from worker.settings import Settings

KEYS = {name: new_key() for name in ("a", "b", "c", "flood", "user")}
FLOOD_LIMITS = Limits(max_batch_jobs=400, batch_rate_per_s=0.5, batch_burst=20)


def line(i: int, tokens: int = 1) -> dict:
    request = JobRequest.simple(f"item {i}", generation={"max_new_tokens": tokens})
    return {"custom_id": f"c-{i}", "request": request.model_dump(mode="json")}


@pytest.fixture(scope="module")
def api(redis_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("fair")
    settings = Settings(redis_url=redis_url, data_dir=data, model="tiny", model_cache_dir=data.parent / "models-cache",
                        max_batch_size=4, concurrency=8, lease_s=2, batch_lane_jobs=4, batch_release_s=0.1,
                        progress_interval_s=0)
    routes = BatchRoutes(open_store(settings.resolved_store_url), max_body_bytes=settings.api_max_batch_bytes)
    roomy = Limits(max_batch_jobs=10_000, batch_burst=20)
    registry = TenantRegistry.of({name: Tenant(name, FLOOD_LIMITS if name == "flood" else roomy,
                                               ((key_hash(key), None),)) for name, key in KEYS.items()})
    with running_worker(settings), serve_in_thread(create_api(redis_url, registry, batches=routes)) as base:
        yield base


def _done_when(redis_client, watch: str, others: dict[str, str], total: int, timeout: float = 300) -> dict[str, int]:
    """Poll the batches' counters; when `watch` has `total` jobs ended, the others' ended counts."""
    batches = Batches(redis_client)
    end = time.monotonic() + timeout
    while True:
        counts = batches.counters.batch(watch)
        if counts["succeeded"] + counts["failed"] + counts["cancelled"] >= total:
            return {name: batches.counters.batch(b)["succeeded"] for name, b in others.items()}
        assert time.monotonic() < end, counts
        time.sleep(0.05)


def test_a_small_batch_does_not_wait_for_a_big_one(api, redis_client):
    with HttpJobClient(api, KEYS["a"]) as a, HttpJobClient(api, KEYS["b"]) as b:
        big = a.submit_batch([line(i) for i in range(400)])["batch_id"]
        small = b.submit_batch([line(i) for i in range(20)])["batch_id"]
        done = _done_when(redis_client, small, {"a": big}, 20)
    print(f"fairness: b's 20 lines done when a had done {done['a']} of 400")
    assert done["a"] < 40  # under 10 % of the big batch: before lanes, all 400 came first


def test_three_tenants_take_turns(api, redis_client):
    with HttpJobClient(api, KEYS["a"]) as a, HttpJobClient(api, KEYS["b"]) as b, HttpJobClient(api, KEYS["c"]) as c:
        big = a.submit_batch([line(i) for i in range(300)])["batch_id"]
        time.sleep(0.5)
        mid = b.submit_batch([line(i) for i in range(60)])["batch_id"]
        small = c.submit_batch([line(i) for i in range(20)])["batch_id"]
        at_small = _done_when(redis_client, small, {"a": big, "b": mid}, 20)
        at_mid = _done_when(redis_client, mid, {"a": big, "c": small}, 60)
    print(f"three tenants: c's 20 done when a had {at_small['a']}, b {at_small['b']}; "
          f"b's 60 done when a had {at_mid['a']}")
    # While all three have work each gets about a third of the lane: c's 20 are done by the time
    # b has done about 20 more and a about 20 more (lane depth and the worker's slots aside).
    assert at_small["a"] < 60 and at_small["b"] < 45
    assert at_mid["a"] < 120


def _latency(client: HttpJobClient, n: int) -> list[float]:
    seconds = []
    for i in range(n):
        started = time.monotonic()
        job_id = client.submit(JobRequest.simple(f"hi {i}", generation={"max_new_tokens": 1}))
        client.wait(job_id, timeout=60)
        seconds.append(time.monotonic() - started)
    return seconds


def test_a_flood_of_batches_is_refused_and_interactive_latency_holds(api, redis_client):
    with HttpJobClient(api, KEYS["user"]) as user, HttpJobClient(api, KEYS["flood"]) as flood:
        quiet = _latency(user, 15)
        accepted, refusals = 0, []
        while not refusals:  # until the quota refuses
            try:
                flood.submit_batch([line(i, tokens=4) for i in range(100)])
                accepted += 1
            except (QuotaExceeded, RateLimited) as exc:
                refusals.append(exc.code.value)
        busy = _latency(user, 15)
    p50_quiet, p50_flood = statistics.median(quiet), statistics.median(busy)
    print(f"flood: {accepted} batches of 100 accepted, then {refusals[0]}; interactive p50 "
          f"{p50_quiet * 1000:.0f} ms quiet, {p50_flood * 1000:.0f} ms under the flood "
          f"(ratio {p50_flood / p50_quiet:.2f})")
    assert accepted >= FLOOD_LIMITS.max_batch_jobs // 100 and refusals == ["quota_exceeded"]
    # Interactive jobs jump the batch lane; they share the engine with the batch rows that run.
    assert p50_flood < 3 * p50_quiet + 0.25


def test_batch_status_is_answered_from_counters(api, redis_client):
    with HttpJobClient(api, KEYS["b"]) as b, httpx.Client(base_url=api, timeout=30) as http:
        batch_id = b.submit_batch([line(i) for i in range(5)])["batch_id"]
        end = time.monotonic() + 60
        while (status := b.batch(batch_id))["state"] != "completed":
            assert time.monotonic() < end, status
            time.sleep(0.2)
        scraped = http.get("/metrics").text
    assert status["counts"]["succeeded"] == 5
    assert Quotas(redis_client).held("b") == (0, 0)  # the finisher let go of the batch's holding
    assert 'ivq_tenant_jobs{kind="batch",state="queued",tenant="b"}' in scraped
