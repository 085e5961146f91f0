"""The Redis users of deploy/OPERATIONS.md against a real redis-server.

The ACL lines are read from the ```acl block of OPERATIONS.md, as written
there (only the password hashes are filled in), so the documented rules are
the tested rules. With them: the API's JobClient submits, reads, waits for and
cancels jobs as `ivq-api`, and so does the HTTP API itself (real uvicorn:
tenants' quotas, event streams, a batch file); a worker with every bootstep
production runs (heartbeat, mingle, gossip, remote control, the sweeper that
finishes batches) runs the jobs and their callbacks as `ivq-worker`; nothing
either does is refused; and the refusals the doc promises hold.

One worker serves both queues: Celery's trace looks tasks up in the process's
default app, so two apps' workers in one process would run each other's tasks.
Production's two Deployments use the same user and the same commands.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from api_client import HttpJobClient, JobClient, JobRequest
from api_client.quotas import Limits
from api_client.schema import JobState
from api_client.webhooks import generate_secret
from worker.jobs.callbacks import list_dead, take_dead
from worker.celery_app import create_app, start_runtime
from worker.ops.embedded import EmbeddedRedis
from worker.http.app import create_api
from worker.ops.embedded import serve_in_thread
from worker.http.batch_routes import BatchRoutes
from worker.io.results_store import open_store
from worker.settings import Settings
from worker.http.tenants import TenantRegistry, new_key

OPERATIONS = Path(__file__).resolve().parents[2] / "deploy" / "OPERATIONS.md"
USERS = {"ivq-api": "API", "ivq-worker": "WORKER", "ivq-keda": "KEDA", "ivq-admin": "ADMIN"}
PASSWORDS = {user: f"test-{user}-pw" for user in USERS}
TENANT_KEY = new_key()


def documented_acl() -> list[str]:
    """The ACL file lines of OPERATIONS.md, placeholders and all."""
    blocks = re.findall(r"^```acl\n(.*?)^```", OPERATIONS.read_text(), re.S | re.M)
    assert len(blocks) == 1, "OPERATIONS.md must have exactly one ```acl block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def acl_file_text() -> str:
    text = "\n".join(documented_acl()) + "\n"
    for user, placeholder in USERS.items():
        token = f"#{placeholder}_PASSWORD_SHA256"
        assert text.count(token) == 1, f"{token} must appear once in the ```acl block"
        text = text.replace(token, "#" + hashlib.sha256(PASSWORDS[user].encode()).hexdigest())
    return text


class AclRedis(EmbeddedRedis):
    """redis-server started with an ACL file; readiness is PING as the admin user (there is no default user)."""

    def __init__(self, data_dir: Path, aclfile: Path) -> None:
        self.aclfile = aclfile
        super().__init__(data_dir)

    def _argv(self) -> list[str]:
        return super()._argv() + ["--aclfile", str(self.aclfile)]

    def _ping(self) -> bool:
        try:
            with self.connect("ivq-admin", socket_timeout=0.5) as conn:
                return bool(conn.ping())
        except (redis.RedisError, OSError):
            return False

    def url_for(self, user: str) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}/0"

    def connect(self, user: str, **kw) -> redis.Redis:
        return redis.Redis.from_url(self.url_for(user), **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[AclRedis]:
    tmp = tmp_path_factory.mktemp("redis-acl")
    aclfile = tmp / "users.acl"
    aclfile.write_text(acl_file_text())
    srv = AclRedis(tmp / "redis", aclfile)
    yield srv
    srv.stop()


@pytest.fixture
def admin(server) -> Iterator[redis.Redis]:
    conn = server.connect("ivq-admin")
    conn.flushdb()
    conn.execute_command("ACL", "LOG", "RESET")
    yield conn
    conn.close()


def refusals(admin: redis.Redis) -> list[dict]:
    """ACL LOG entries, less redis-py's CLIENT SETINFO on connect (refused and ignored, see OPERATIONS.md)."""
    return [e for e in admin.acl_log(count=200) if (e["reason"], e["object"]) != ("command", "client")]


class Receiver:
    """A webhook receiver on 127.0.0.1: 200 for /ok, 500 for anything else."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                paths.append(self.path)
                self.send_response(200 if self.path == "/ok" else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def consuming(app: Celery, hostname: str) -> Iterator[None]:
    """A worker in a thread with production's bootsteps; tests/harness.py turns mingle, gossip and
    heartbeats off, and those are what need the pidbox/celeryev keys and channels."""
    from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker
    from celery.worker import state

    settings: Settings = app.ivq_settings
    runtime = start_runtime(app)
    setup_app_for_worker(app, "WARNING", None)
    worker = TestWorkController(
        app=app, hostname=hostname, pool="threads", concurrency=settings.resolved_concurrency,
        queues=settings.queues, loglevel="WARNING", logfile=None, ready_callback=None,
        without_heartbeat=False, without_mingle=False, without_gossip=False,
    )
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    worker.ensure_started()
    try:
        yield
    finally:
        state.should_terminate = 0  # what start_worker does to stop its worker
        thread.join(60)
        state.should_terminate = None
        runtime.stop()
        assert not thread.is_alive(), f"worker {hostname} did not stop"


def until(check: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"not true after {timeout}s: {check}")


def test_the_documented_users_are_loaded_and_the_default_user_is_off(server, admin):
    assert set(admin.acl_users()) == {"default", *USERS}
    assert "off" in admin.acl_getuser("default")["flags"]
    for user in USERS:
        assert "on" in admin.acl_getuser(user)["flags"], user


def small(prompt: str, **kw) -> JobRequest:
    return JobRequest.simple(prompt, generation={"max_new_tokens": 2}, **kw)


def test_api_user_and_worker_user_run_jobs_end_to_end(server, admin, tmp_path):
    receiver = Receiver()
    settings = Settings(  # lease_s 4: the sweeper (which also finishes batches) runs every 2 s
        redis_url=server.url_for("ivq-worker"), data_dir=tmp_path, model="tiny",
        model_cache_dir=tmp_path.parent / "models-cache", max_batch_size=2, lease_s=4,
        webhook_secret=generate_secret(), callback_allow_private=True, callback_max_attempts=2,
        callback_backoff_base_s=0.2, callback_backoff_cap_s=0.5, callback_timeout_s=2.0,
    )
    app = create_app(settings.model_copy(update={"queues": ["infer", "callbacks"], "worker_id": "acl-worker"}))
    worker_redis = server.connect("ivq-worker")
    api = JobClient(server.url_for("ivq-api"))
    tenants = TenantRegistry.for_keys({"acme": TENANT_KEY}, Limits(max_active=10))
    http_api = create_api(server.url_for("ivq-api"), tenants, batches=BatchRoutes(
        open_store(settings.resolved_store_url), max_body_bytes=settings.api_max_batch_bytes))
    try:
        # Cancelled while queued, before any worker runs: the API's cancel path.
        never = api.submit(small("never runs"))
        assert api.cancel(never).state is JobState.cancelled
        with consuming(app, "acl-worker@test"), serve_in_thread(http_api) as base, \
                HttpJobClient(base, TENANT_KEY) as http:
            ok = api.submit(small("hello", priority=5, callback={"url": receiver.url + "/ok"}))
            bad = api.submit(small("hello", idempotency_key="acl-1", callback={"url": receiver.url + "/down"}))
            assert api.submit(small("again", idempotency_key="acl-1")) == bad
            assert api.wait(ok, timeout=60).state is JobState.succeeded
            assert api.wait(bad, timeout=60).state is JobState.succeeded
            assert api.status(never).state is JobState.cancelled
            assert isinstance(api.result(ok).output_text, str)
            assert [e["state"] for e in api.events(ok, timeout=5)][-1] == "succeeded"
            until(lambda: "/ok" in receiver.paths)
            # Two attempts at the receiver that answers 500, then the dead-letter list.
            (dead,) = until(lambda: list_dead(worker_redis))
            assert dead["delivery"]["job_id"] == bad and receiver.paths.count("/down") == 2
            # Remote control round trip (pidbox broadcast, replies) as the worker user.
            assert [name for reply in app.control.ping(timeout=2) for name in reply] == ["acl-worker@test"]
            assert admin.hexists("ivq:workers", "acl-worker")  # heartbeats
            # The HTTP API: a tenant's submit (admitted against its quota), its event stream, a cancel
            # that comes too late, and a batch file that the worker's sweeper finishes.
            job = http.submit(small("over http"))
            assert http.wait(job, timeout=60).state is JobState.succeeded and http.result(job) is not None
            assert http.cancel(job).state is JobState.succeeded
            lines = [{"custom_id": f"c-{i}", "request": small(f"item {i}").model_dump(mode="json")} for i in range(3)]
            batch = http.submit_batch(lines)["batch_id"]
            until(lambda: http.batch(batch)["state"] == "completed", timeout=60)
            assert [r["custom_id"] for r in http.batch_results(batch)] == ["c-0", "c-1", "c-2"]
        assert [d["job_id"] for d in take_dead(worker_redis)] == [bad]  # `callbacks replay`
        assert not refusals(admin), refusals(admin)
    except Exception as exc:
        exc.add_note(f"refused by the ACL: {refusals(admin)}")  # what to add to OPERATIONS.md, if anything
        raise
    finally:
        api.close()
        worker_redis.close()
        receiver.close()


API_REFUSED = [
    ("HGETALL", "unacked"),  # the messages workers hold
    ("ZRANGE", "unacked_index", 0, -1),
    ("HGETALL", "ivq:workers"),
    ("LRANGE", "ivq:callbacks:dead", 0, -1),  # webhook payloads
    ("BRPOP", "infer", 1),  # taking a job off the queue
    ("DEL", "unacked"),  # it may delete a job record (a withdrawn submit), never the broker's bookkeeping
    ("PUBLISH", "/0.celery.pidbox", "x"),  # the workers' remote control
    ("SUBSCRIBE", "/0.celery.pidbox"),
    ("PUBLISH", "/0.celeryev/worker.heartbeat", "x"),  # fake task events
    ("PSUBSCRIBE", "/0.celeryev/*"),
    ("SET", "elsewhere", "x"),
    ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("SCAN", 0), ("CONFIG", "GET", "*"),
    ("ACL", "LIST"), ("CLIENT", "LIST"), ("DEBUG", "SLEEP", 0), ("SCRIPT", "FLUSH"), ("EVAL", "return 1", 0),
]


@pytest.mark.parametrize("command", API_REFUSED, ids=lambda c: " ".join(map(str, c)))
def test_api_user_is_refused_what_only_workers_or_admins_do(server, admin, command):
    admin.hset("unacked", "tag", "message")
    admin.zadd("unacked_index", {"tag": 1})
    admin.rpush("ivq:callbacks:dead", "{}")
    with server.connect("ivq-api") as api, pytest.raises(redis.exceptions.NoPermissionError):
        api.execute_command(*command)
    assert admin.hget("unacked", "tag") == b"message"


def test_api_user_reaches_tenant_batch_and_queue_keys(server, admin):
    with server.connect("ivq-api") as api:
        api.zadd("{ivq:tenant:acme}:active", {"job-1": 1.0})
        api.hset("{ivq:batch:b1}:meta", "total", 1)
        assert api.zrange("{ivq:tenant:acme}:active", 0, -1) == [b"job-1"]
        assert api.llen("infer:9") == 0 and api.llen("callbacks") == 0


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "SET", "appendonly", "no"), ("ACL", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"), ("DEBUG", "SLEEP", 0), ("MONITOR",), ("SET", "elsewhere", "x"),
    ("PUBLISH", "elsewhere", "x"),
], ids=lambda c: " ".join(map(str, c)))
def test_worker_user_is_refused_admin_commands_and_foreign_keys(server, admin, command):
    with server.connect("ivq-worker") as worker, pytest.raises(redis.exceptions.NoPermissionError):
        worker.execute_command(*command)


# KEDA v2.17 pkg/scalers/redis_scaler.go: how its redis scalers read a key's length.
KEDA_LENGTH_SCRIPT = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
return redis.call(cmd[listType], listName)
"""


def test_keda_user_reads_the_waiting_count_only(server, admin):
    admin.lpush("infer:3", "m")
    with server.connect("ivq-keda") as keda:
        assert keda.eval(KEDA_LENGTH_SCRIPT, 1, "ivq:waiting") == 0  # nothing waits: no key, LLEN of none
        admin.zadd("ivq:waiting", {"job-1": 1.0, "job-2": 2.0})
        assert keda.eval(KEDA_LENGTH_SCRIPT, 1, "ivq:waiting") == 2
        for command in (("ZRANGE", "ivq:waiting", 0, -1), ("ZREM", "ivq:waiting", "job-1"), ("LLEN", "infer:3"),
                        ("LRANGE", "infer:3", 0, -1), ("HGETALL", "unacked"), ("RPOP", "infer:3"),
                        ("EVAL", KEDA_LENGTH_SCRIPT, 1, "infer:3"),
                        ("EVAL", "return redis.call('zrange', KEYS[1], 0, -1)", 1, "ivq:waiting")):
            # NOPERM, or inside a script "The user executing the script can't run this command / access ..."
            with pytest.raises(redis.exceptions.ResponseError, match="(?i)perm|can't"):
                keda.execute_command(*command)
    assert admin.llen("infer:3") == 1 and admin.zcard("ivq:waiting") == 2


@pytest.mark.parametrize("credentials", [
    {}, {"password": "anything"}, {"username": "default", "password": "anything"},
    {"username": "ivq-api", "password": "wrong"}, {"username": "ivq-worker", "password": PASSWORDS["ivq-api"]},
], ids=["no user, no password", "password only", "default user", "wrong password", "another user's password"])
def test_a_connection_without_a_users_own_password_is_refused(server, credentials):
    conn = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, retry=Retry(NoBackoff(), 0),
                       **credentials)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            conn.ping()
    finally:
        conn.close()
