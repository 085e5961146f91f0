"""The job state machine (api_client/jobstate.py): one test per named script, then proof
that every script touches only the keys it is given, on one Redis and on a Redis Cluster."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from api_client import JobRequest, keys
from api_client.jobstate import SCRIPTS, JobStore
from tests.services import RedisClusterServers

HOOK = {"url": "https://hooks.example.com/x", "events": ["running", "succeeded", "failed", "cancelled"]}


def _request(callback: dict | None = None) -> str:
    return JobRequest.simple("x", callback=callback).model_dump_json(exclude_none=True)


def _create(jobs: JobStore, *, deadline: float | None = None, callback: dict | None = None,
            idempotency_key: str | None = None) -> str:
    job_id = jobs.new_job_id(idempotency_key)
    created = jobs.create(job_id, _request(callback), now=time.time(), priority=3, deadline=deadline,
                          idempotency_key=idempotency_key)
    return created.job_id


@pytest.fixture
def jobs(redis_client):
    redis_client.flushdb()
    return JobStore(redis_client, worker_id="w1", lease_s=30, max_crashes=2)


def _in(r, zset: str, job_id: str) -> bool:
    return r.zscore(zset, job_id) is not None


def test_create_records_indexes_and_honours_the_idempotency_key(jobs, redis_client):
    job_id = _create(jobs, deadline=time.time() + 60)
    k = keys.JobKeys.of(job_id)
    assert jobs.state(job_id) == "queued" and jobs.raw(job_id)["priority"] == "3"
    assert _in(redis_client, k.shard.queued, job_id) and _in(redis_client, k.shard.deadlines, job_id)
    assert [e["state"] for e in jobs.events(job_id)] == ["queued"]
    assert 0 < redis_client.ttl(k.record) <= keys.JOB_TTL_S
    first = _create(jobs, idempotency_key="order-7")
    again = jobs.create(jobs.new_job_id("order-7"), _request(), now=time.time(), priority=0, deadline=None,
                        idempotency_key="order-7")
    assert not again.done and again.job_id == first
    assert keys.shard_of(first) == keys.idempotency_shard("internal/order-7")  # both keys in one slot
    other = jobs.create(jobs.new_job_id("order-7", "acme"), _request(), now=time.time(), priority=0, deadline=None,
                        idempotency_key="order-7", tenant="acme")
    assert other.done and other.job_id != first  # another tenant's same key is another job
    assert jobs.raw(other.job_id)["tenant"] == "acme" and jobs.raw(first)["tenant"] == "internal"


def test_claim_fences_duplicates_and_owes_the_running_callback(jobs, redis_client):
    job_id = _create(jobs, callback=HOOK)
    claimed = jobs.claim(job_id)
    assert claimed.outcome == "claimed" and claimed.claim.attempt == 1 and claimed.notify == "running"
    shard = keys.JobKeys.of(job_id).shard
    assert _in(redis_client, shard.leases, job_id) and not _in(redis_client, shard.queued, job_id)
    assert jobs.claim(job_id).outcome == "busy"  # a duplicate delivery while the lease is live
    assert jobs.claim("no-such-job").outcome == "missing"


def test_claim_after_the_deadline_ends_the_job_expired(jobs):
    job_id = _create(jobs, deadline=time.time() - 1, callback=HOOK)
    claimed = jobs.claim(job_id)
    assert (claimed.outcome, claimed.state, claimed.notify, claimed.claim) == ("expired", "failed", "failed", None)
    assert jobs.raw(job_id)["error_code"] == "expired"


def test_renew_extends_only_the_holders_lease(jobs):
    job_id = _create(jobs)
    claim = jobs.claim(job_id).claim
    before = float(jobs.raw(job_id)["lease_until"])
    time.sleep(0.01)
    assert jobs.renew(claim) and float(jobs.raw(job_id)["lease_until"]) > before
    stranger = type(claim)(**{**claim.__dict__, "token": "not-mine"})
    assert not jobs.renew(stranger)


def test_progress_is_the_holders_latest_snapshot_and_not_an_event(jobs):
    from api_client.schema import JobStatus

    job_id = _create(jobs)
    claim = jobs.claim(job_id).claim
    stranger = type(claim)(**{**claim.__dict__, "token": "not-mine"})
    assert jobs.progress(claim, 3, "Once") and not jobs.progress(stranger, 9, "forged")
    status = JobStatus.from_record(jobs.raw(job_id))
    assert (status.progress.completion_tokens, status.progress.text) == (3, "Once")
    assert [e["state"] for e in jobs.events(job_id)] == ["queued", "running"]  # no event per snapshot
    jobs.succeed(claim, {})
    assert JobStatus.from_record(jobs.raw(job_id)).progress is None and not jobs.progress(claim, 4, "late")


def test_succeed_writes_fields_for_the_holder_only(jobs, redis_client):
    job_id = _create(jobs, callback={"url": HOOK["url"]})  # default events: the terminal ones
    claim = jobs.claim(job_id).claim
    stranger = type(claim)(**{**claim.__dict__, "token": "not-mine"})
    assert not jobs.succeed(stranger, {"result": "{}"}).done
    ended = jobs.succeed(claim, {"output_preview": "hi"})
    assert (ended.done, ended.state, ended.notify) == (True, "succeeded", "succeeded")
    rec = jobs.raw(job_id)
    assert rec["state"] == "succeeded" and rec["output_preview"] == "hi" and "claim" not in rec
    assert not _in(redis_client, keys.JobKeys.of(job_id).shard.leases, job_id)
    assert jobs.claim(job_id).outcome == "terminal"


def test_fail_records_code_and_message(jobs):
    job_id = _create(jobs)
    ended = jobs.fail(jobs.claim(job_id).claim, "invalid_media", "not a JPEG")
    assert (ended.done, ended.state, ended.notify) == (True, "failed", None)  # no callback was asked for
    rec = jobs.raw(job_id)
    assert (rec["error_code"], rec["error_message"]) == ("invalid_media", "not a JPEG")


def test_requeue_gives_the_job_back_counting_the_attempt_or_not(jobs, redis_client):
    job_id = _create(jobs)
    assert jobs.requeue(jobs.claim(job_id).claim, "draining", count_attempt=False)
    assert jobs.raw(job_id)["attempts"] == "0" and jobs.state(job_id) == "queued"
    assert _in(redis_client, keys.JobKeys.of(job_id).shard.queued, job_id)
    claim = jobs.claim(job_id).claim
    assert claim.attempt == 1 and jobs.requeue(claim, "timeout", count_attempt=True)
    assert jobs.claim(job_id).claim.attempt == 2
    assert [e.get("retry_of") for e in jobs.events(job_id) if e["state"] == "queued"] == [None, "draining", "timeout"]


def test_cancel_ends_a_queued_or_running_job_once(jobs):
    queued, running = _create(jobs, callback=HOOK), _create(jobs)
    claim = jobs.claim(running).claim
    assert jobs.cancel(queued).notify == "cancelled"
    done = jobs.cancel(running)
    assert (done.done, done.state, done.notify) == (True, "cancelled", None)
    assert not jobs.cancel(queued).done  # already ended
    assert not jobs.succeed(claim, {}).done  # the worker lost its claim: its result is refused


def test_expire_ends_late_queued_jobs_from_the_sweeper(jobs, redis_client):
    late, running = _create(jobs, deadline=time.time() + 0.2, callback=HOOK), _create(jobs, deadline=time.time() + 0.2)
    jobs.claim(running)
    time.sleep(0.3)
    changed = {t.job_id: t for t in jobs.sweep(resend_after_s=3600)}
    assert changed[late].outcome == "expired" and changed[late].notify == "failed"
    assert jobs.raw(late)["error_code"] == "expired" and running not in changed
    assert jobs.state(running) == "running"  # it started in time: the deadline no longer applies
    assert not _in(redis_client, keys.JobKeys.of(running).shard.deadlines, running)


def test_sweep_requeues_a_dead_workers_job_then_poisons_it(redis_client):
    redis_client.flushdb()
    jobs = JobStore(redis_client, worker_id="w1", lease_s=0.05, max_crashes=2)
    job_id = _create(jobs, callback=HOOK)
    jobs.claim(job_id)
    time.sleep(0.1)  # the holder died: nobody renews
    [t] = jobs.sweep(resend_after_s=3600)
    assert (t.outcome, t.state, t.priority) == ("requeued", "queued", 3)
    jobs.claim(job_id)
    time.sleep(0.1)
    [t] = jobs.sweep(resend_after_s=3600)
    assert (t.outcome, t.state, t.notify) == ("poisoned", "failed", "failed")
    assert jobs.raw(job_id)["crashes"] == "2" and jobs.raw(job_id)["error_code"] == "poison"


def test_sweep_flags_queued_jobs_whose_message_may_be_lost(jobs):
    job_id = _create(jobs)
    assert jobs.sweep(resend_after_s=3600) == []
    time.sleep(0.05)
    [t] = jobs.sweep(resend_after_s=0.01)
    assert (t.outcome, t.job_id, t.priority) == ("resend", job_id, 3)
    assert jobs.sweep(resend_after_s=3600) == []  # pushed back by another interval


def _exercise(jobs: JobStore) -> dict[str, list[str]]:
    """Run every named script at least once; returns job id -> the keys its scripts were given."""
    a = _create(jobs, callback=HOOK, idempotency_key="k-1", deadline=time.time() + 60)
    b, c, d = _create(jobs), _create(jobs, deadline=time.time() - 1), _create(jobs, deadline=time.time() + 0.05)
    claim = jobs.claim(a).claim
    jobs.renew(claim)
    jobs.progress(claim, 2, "so far")
    jobs.requeue(claim, "timeout", count_attempt=True)
    jobs.succeed(jobs.claim(a).claim, {"output_preview": "x"})
    jobs.fail(jobs.claim(b).claim, "invalid_media", "bad")
    jobs.claim(c)
    jobs.cancel(d)
    e = _create(jobs, deadline=time.time() + 0.05)
    time.sleep(0.1)
    jobs.sweep(resend_after_s=0.0)
    jobs.run("sweep", a, repr(time.time()), 2, repr(time.time()))
    f = _create(jobs, idempotency_key="k-2")
    assert jobs.withdraw(f, "k-2") and not jobs.exists(f)  # a refused submit's record goes
    return {j: [*keys.JobKeys.of(j).as_list(), keys.waiting_key(j, jobs.clustered),
                *(keys.idempotency(k, keys.shard_of(j)) for k in ("internal/k-1", "internal/k-2", "-"))]
            for j in (a, b, c, d, e, f)}


_ONE_KEY_COMMANDS = {"HSET", "HGET", "HMGET", "HDEL", "HINCRBY", "RPUSH", "EXPIRE", "ZADD", "ZREM", "ZSCORE",
                     "GET", "SET", "PUBLISH", "ZREMRANGEBYSCORE", "EXISTS", "DEL"}


def _monitor(port: int, stop: threading.Event, lines: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"MONITOR\r\n")
        sock.settimeout(0.2)
        buf = b""
        while not stop.is_set() or buf:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if stop.is_set():
                    break
                continue
            buf += chunk
            *done, buf = buf.split(b"\r\n")
            lines.extend(x.decode(errors="replace") for x in done)


def test_every_script_touches_only_the_keys_it_is_given(jobs, redis_server):
    lines: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_monitor, args=(redis_server.port, stop, lines))
    watcher.start()
    time.sleep(0.2)
    given = _exercise(jobs)
    time.sleep(0.3)
    stop.set()
    watcher.join()
    allowed = {k for ks in given.values() for k in ks}
    from_lua = [re.findall(r'"((?:[^"\\]|\\.)*)"', line) for line in lines if " lua]" in line]
    assert len(from_lua) > 50, lines[:5]
    commands = {args[0].upper() for args in from_lua}
    assert commands <= _ONE_KEY_COMMANDS, commands - _ONE_KEY_COMMANDS  # each takes its key first
    strays = {args[1] for args in from_lua if args[1] not in allowed}
    assert not strays, strays
    assert set(SCRIPTS) == {"create", "claim", "renew", "succeed", "fail", "requeue", "cancel", "expire", "sweep",
                            "progress", "withdraw"}


def test_every_script_runs_on_a_redis_cluster(tmp_path):
    cluster = RedisClusterServers(tmp_path, nodes=3)
    try:
        client = cluster.client()
        jobs = JobStore(client, worker_id="w1", lease_s=30, max_crashes=2)
        given = _exercise(jobs)  # a key outside the job's slot would fail with CROSSSLOT or "non local key"
        slots = {client.keyslot(k) for ks in given.values() for k in ks[:7]}
        assert len(slots) > 1  # the jobs really are spread over slots (and nodes)
        states = {j: jobs.state(j) for j in given}
        assert sorted(s or "" for s in states.values()) == ["", "cancelled", "failed", "failed", "failed",
                                                            "succeeded"], states
        owed = jobs.owed_callbacks(older_than_s=0.0)
        assert {event for _, event in owed} == {"running", "succeeded"}
        assert jobs.lost([jobs.claim(_create(jobs)).claim]) == []
        client.close()
    finally:
        cluster.stop()


def test_counters_lanes_and_quotas_run_on_a_redis_cluster(tmp_path):
    """The counters live in each job's shard (summed on read), the backlog, lane, holdings and
    streams in the tenant's slot: every script still touches one slot."""
    from api_client.counters import Counters
    from api_client.lanes import Lanes
    from api_client.quotas import Limits, Quotas

    cluster = RedisClusterServers(tmp_path, nodes=3)
    try:
        client = cluster.client()
        jobs, lanes, quotas = JobStore(client, worker_id="w1", lease_s=30), Lanes(client, lane_jobs=3), Quotas(client)
        limits = Limits(max_batch_jobs=10, max_streams=1)
        quotas.admit_batch("t1", "batch_x", 6, 600, limits, now=time.time())
        ids = [jobs.new_job_id(None) for _ in range(6)]
        for j in ids:
            jobs.create(j, _request(), now=time.time(), priority=keys.BATCH_PRIORITY, deadline=None,
                        idempotency_key=None, tenant="t1", batch_id="batch_x")
        client.hset(keys.BatchKeys.of("batch_x").record, "state", "in_progress")
        lanes.push("t1", ids)
        taken = lanes._take_all(["t1"], time.time())[0]
        assert taken == ids[:3] and lanes.backlog(["t1"]) == {"t1": (3, 3)}
        for job_id in taken[:2]:
            assert jobs.succeed(jobs.claim(job_id).claim, {"result": "{}"}).done
        jobs.cancel(taken[2])
        assert Counters(client).batch("batch_x") == {"queued": 3, "running": 0, "succeeded": 2, "failed": 0,
                                                     "cancelled": 1}
        assert Counters(client).tenant("t1")["batch"] == {"queued": 3, "running": 0}
        assert quotas.unhold_ended("t1") == 3 and quotas.held("t1")[0] == 3
        quotas.open_stream("t1", "s1", limits, now=time.time(), lapse_s=30)
        assert quotas.streams("t1", now=time.time()) == 1
        client.close()
    finally:
        cluster.stop()
