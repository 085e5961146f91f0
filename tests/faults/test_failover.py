"""Redis fails over, twice, under load, and nothing acknowledged is lost; then a negative control in
which the same checker must find loss.

A primary, a replica and three sentinels on loopback (tests/faults/sentinels.py); two workers and
the HTTP API, all on one `redis+sentinel://` URL. Producers submit directly (JobClient) and over
HTTP, and one batch file goes in, while the primary gets SIGKILL, is started again as a replica,
and then the new primary gets SIGKILL too. Every submit is acknowledged (durability `replica`: a
replica had the record, WAIT) or refused (unavailable: 503 / BrokerUnavailable). The checker
(tests/faults/ledger.py) counts the acknowledged jobs lost (no record), failed, and run to more
than one result.

Negative control: durability `local` and the replica paused (SIGSTOP, its link cut) before the
primary is killed: the replica is promoted without the jobs acknowledged meanwhile, and the checker must say
so. Without it, "0 lost" would prove nothing about the checker.
"""

from __future__ import annotations

import time

import pytest

from api_client import HttpJobClient, JobClient, JobRequest, keys
from api_client.redis_conn import sync_client
from tests.faults.common import record
from tests.faults.ledger import Producer, check, not_done, settle
from tests.faults.procs import WorkerProc, worker_env
from tests.faults.sentinels import ReplicatedRedis
from worker.http.app import create_api
from worker.http.batch_routes import BatchRoutes
from worker.http.tenants import TenantRegistry, new_key
from worker.io.results_store import open_store
from worker.ops.embedded import serve_in_thread

KEY = new_key()
BATCH_LINES = 60
RESEND_LOST_AFTER_S = 3
STEADY_S = 3.0


@pytest.fixture
def replicated(tmp_path):
    topology = ReplicatedRedis(tmp_path / "redis")
    yield topology
    topology.stop()


def _small(text: str) -> JobRequest:
    return JobRequest.simple(text, generation={"max_new_tokens": 4})


def test_failover_loses_no_acknowledged_job_and_the_negative_control_finds_loss(replicated, model_cache, tmp_path):
    url = replicated.url
    env = worker_env(redis_url=url, data_dir=tmp_path / "data", model_cache_dir=model_cache, max_batch_size=8,
                     lease_s=6, visibility_timeout_s=60, resend_lost_after_s=RESEND_LOST_AFTER_S)
    workers = [WorkerProc(env, tmp_path / "logs", f"w{i}").start() for i in range(2)]
    direct = JobClient(url)
    assert direct.durability.mode == "replica"  # the default with Sentinel
    routes = BatchRoutes(open_store(f"file://{tmp_path / 'data' / 'store'}"), max_body_bytes=1 << 20)
    app = create_api(url, TenantRegistry.for_keys({"acme": KEY}), batches=routes)
    try:
        for w in workers:
            w.wait_ready(url)
        with serve_in_thread(app) as base, HttpJobClient(base, KEY) as http:
            figures = _failover_rounds(replicated, direct, http)
            for w in workers:
                assert w.alive(), f"{w.worker_id} exited with {w.returncode}:\n{w.tail()}"
            lost = _negative_control(replicated, url)
    finally:
        for w in workers:
            w.stop()
        direct.close()
    record(f"failover x2 (sentinel, durability replica): {figures}")
    record(f"negative control (durability local, replica paused, then promoted): {lost}")


def _failover_rounds(replicated: ReplicatedRedis, direct: JobClient, http: HttpJobClient) -> str:
    producers = [Producer(lambda n: direct.submit(_small(f"direct {n}")), pause_s=0.02).start(),
                 Producer(lambda n: http.submit(_small(f"http {n}")), pause_s=0.1).start()]
    batch_id, failovers, outages = "", [], []
    t_start = time.monotonic()
    try:
        time.sleep(STEADY_S)
        while not batch_id:  # one batch file, in flight across the first kill
            try:
                batch_id = http.submit_batch([{"custom_id": f"c{i}", "request": _small(f"line {i}").model_dump(
                    mode="json")} for i in range(BATCH_LINES)])["batch_id"]
            except Exception:  # noqa: BLE001 - refused (503): submit it again
                time.sleep(0.2)
        for _ in range(2):
            t_kill = time.monotonic()
            victim, took = replicated.kill_primary()
            failovers.append(took)
            replicated.restart_as_replica(victim)
            replicated.wait_linked()
            time.sleep(STEADY_S)
            acks = sorted(at for p in producers for at in p.acked_at if t_kill - 5 < at)
            outages.append(max(b - a for a, b in zip(acks, acks[1:], strict=False)))  # the longest silence
    finally:
        for p in producers:
            p.stop()
    t_stop = time.monotonic()
    r = sync_client(replicated.url)
    lines = [x.decode().split("\t")[1] for x in r.lrange(keys.BatchKeys.of(batch_id).jobs, 0, -1)]
    acked = [j for p in producers for j in p.acked] + lines
    result, _ = settle(r, acked, timeout=90)
    done_after = time.monotonic() - t_stop
    refused = sum(p.refused for p in producers)
    figures = (f"{result}, batch lines {len(lines)}/{BATCH_LINES}, refused submits {refused}, failover "
               f"{', '.join(f'{f:.1f}s' for f in failovers)}, outage (longest gap between acknowledgements) "
               f"{', '.join(f'{o:.1f}s' for o in outages)}, all done {done_after:.1f}s after the producers "
               f"stopped ({t_stop - t_start:.0f}s of submitting)")
    print(figures)
    assert not [e for p in producers for e in p.unexpected], [e for p in producers for e in p.unexpected][:5]
    assert len(lines) == BATCH_LINES, figures
    assert result["acknowledged"] > 200, figures
    assert (result["lost"], result["failed"], result["duplicates"], result["not_done"]) == (0, 0, 0, 0), \
        f"{figures}\n{not_done(r, acked)}"
    r.close()
    return figures


def _negative_control(replicated: ReplicatedRedis, url: str) -> dict[str, int]:
    """Durability local, the replica paused: jobs acknowledged by the primary alone die with it."""
    replicated.wait_linked()
    careless = JobClient(url, durability="local")
    replica = replicated.replica()
    replica.pause()
    # Cut its link too: a paused process still has, in its socket buffer, what the primary sent it.
    primary = replicated.primary()
    primary.client().client_kill_filter(_type="replica")
    try:
        acked = [careless.submit(_small(f"unreplicated {i}")) for i in range(30)]
        primary.kill()
    finally:
        replica.resume()
    deadline = time.monotonic() + 60
    while any(s.primary_port() in (primary.port, None) for s in replicated.sentinels):
        assert time.monotonic() < deadline, "the paused replica was never promoted"
        time.sleep(0.1)
    r = sync_client(url)
    result = check(r, acked)
    r.close()
    careless.close()
    assert result["lost"] > 0, f"the checker saw no loss where loss was made: {result}"
    return result
