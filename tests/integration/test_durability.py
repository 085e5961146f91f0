"""Durability `replica`: a submit is acknowledged only once a replica has its record (WAIT), and
refused as unavailable otherwise, with what it had written withdrawn. A real primary and a real
replica (`--replicaof`); the replica is paused (SIGSTOP) to make WAIT time out. The HTTP API
answers such a refusal, and a Redis that is gone, with 503 and Retry-After.
"""

from __future__ import annotations

import time

import httpx
import pytest

from api_client import BrokerUnavailable, JobClient, JobRequest, keys
from api_client.redis_conn import Durability, broker_options, broker_url, default_durability, parse_url
from tests.faults.sentinels import Node
from worker.http.app import create_api
from worker.http.batch_routes import BatchRoutes
from worker.http.tenants import TenantRegistry, new_key
from worker.io.results_store import open_store
from worker.ops.embedded import serve_in_thread

KEY = new_key()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("durability")
    primary = Node(base / "primary")
    replica = Node(base / "replica", replicaof=primary.port)
    deadline = time.monotonic() + 20
    while replica.client().info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never linked"
        time.sleep(0.05)
    yield primary, replica
    replica.stop()
    primary.stop()


def _jobs(primary) -> int:
    return sum(1 for _ in primary.client().scan_iter(keys.job_pattern()))


def test_a_submit_waits_for_the_replica_and_is_refused_and_withdrawn_without_it(pair):
    primary, replica = pair
    with JobClient(primary.url, durability="replica") as client:
        job_id = client.submit(JobRequest.simple("kept"))
        assert replica.client().hget(keys.job(job_id), "state") == b"queued"  # on the replica when acknowledged
        before = _jobs(primary)
        replica.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="replicas confirmed"):
                client.submit(JobRequest.simple("refused", idempotency_key="order-1"))
            waited = time.monotonic() - t0
        finally:
            replica.resume()
        assert 1.0 <= waited < 5.0  # the WAIT timeout, not a hang
        assert _jobs(primary) == before  # withdrawn: no record, and the idempotency key is free again
        again = client.submit(JobRequest.simple("retried", idempotency_key="order-1"))
        assert client.status(again).state.value == "queued"
    with JobClient(primary.url) as local:  # a plain URL: `local` unless asked
        assert local.durability.mode == "local"
        replica.pause()
        try:
            local.submit(JobRequest.simple("no wait"))
        finally:
            replica.resume()


def test_a_demoted_primary_is_retried_then_refused_as_unavailable(pair):
    """READONLY, also from inside a script (Redis 6 wraps it), is retried on a fresh connection and,
    if the node stays a replica, refused as unavailable: never a 500."""
    _, replica = pair
    with JobClient(replica.url, socket_timeout=5) as stale:
        with pytest.raises(BrokerUnavailable, match="replica now") as refused:
            stale.submit(JobRequest.simple("to a replica"))
    assert "READONLY" in str(refused.value)


def test_the_api_answers_503_with_retry_after_for_a_refused_submit_or_batch_and_a_gone_redis(pair, tmp_path):
    primary, replica = pair
    routes = BatchRoutes(open_store(f"file://{tmp_path / 'store'}"), max_body_bytes=1 << 20)
    app = create_api(primary.url, TenantRegistry.for_keys({"acme": KEY}), batches=routes, durability="replica")
    body = JobRequest.simple("x").model_dump(mode="json")
    lines = "\n".join(httpx.Request("POST", "/", json={"custom_id": f"c{i}", "request": body}).content.decode()
                      for i in range(5))
    with serve_in_thread(app) as base, httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                                    timeout=30) as http:
        assert http.post("/v1/jobs", json=body).status_code == 202
        before = _jobs(primary)
        replica.pause()
        try:
            refused = http.post("/v1/jobs", json=body)
            batch = http.post("/v1/native/batches", content=lines, headers={"Content-Type": "application/jsonl"})
        finally:
            replica.resume()
        for response in (refused, batch):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "broker_unavailable"
            assert response.headers["Retry-After"] == "2"
        assert _jobs(primary) == before  # the job and the batch's five jobs were withdrawn
        assert not list(primary.client().scan_iter("{ivq:batch:*"))  # and the batch record with them
        primary.stop()
        try:
            gone = http.get(f"/v1/jobs/{'0' * 32}")
        finally:
            primary.start()
        assert gone.status_code == 503 and gone.headers["Retry-After"] == "2"


def test_sentinel_urls_parse_for_every_client_and_the_broker():
    url = "redis+sentinel://ivq-api:p%40ss@s1:26379,s2,10.0.0.3:26380/mymaster/2"
    target = parse_url(url)
    assert target.sentinels == (("s1", 26379), ("s2", 26379), ("10.0.0.3", 26380))
    assert (target.service, target.db, target.username, target.password) == ("mymaster", 2, "ivq-api", "p@ss")
    assert broker_url(url) == ";".join(f"sentinel://ivq-api:p%40ss@{h}/2" for h in ("s1:26379", "s2:26379",
                                                                                      "10.0.0.3:26380"))
    assert broker_options(url) == {"master_name": "mymaster",
                                   "sentinel_kwargs": {"username": "ivq-api", "password": "p@ss"}}
    assert default_durability(url) == Durability("replica")
    assert default_durability("redis://r:6379/0") == Durability("local")
    plain = "redis://:pw@r:6379/0"
    assert (broker_url(plain), broker_options(plain), parse_url(plain).is_sentinel) == (plain, {}, False)
    for bad in ("redis+sentinel://s1:26379", "redis+sentinel:///svc", "redis+sentinel://s1/svc/x", "http://x"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_a_password_reaches_the_sentinels_the_primary_and_the_broker(tmp_path):
    """Every data node and every sentinel asks for the password; the URL's reaches them all: a
    submit (record, WAIT, Celery message through kombu's sentinel transport) and a status."""
    from tests.faults.sentinels import ReplicatedRedis

    topology = ReplicatedRedis(tmp_path / "redis", password="s3cret/+")
    try:
        with JobClient(topology.url) as client:
            assert client.durability.mode == "replica"
            job_id = client.submit(JobRequest.simple("through sentinels"))
            assert client.status(job_id).state.value == "queued"
        primary = topology.primary().client()
        assert any(job_id.encode() in m for n in keys.infer_queue_lists() for m in primary.lrange(n, 0, -1))
        with pytest.raises(BrokerUnavailable), JobClient(topology.url.replace("s3cret", "wrong")) as wrong:
            wrong.submit(JobRequest.simple("refused"))
    finally:
        topology.stop()
