"""A corpus of malformed and hostile inputs: each gets its stable code, and the worker keeps serving.

Table-driven. Three places refuse input:
- submit: JobClient raises RequestRejected(invalid_request) before anything is recorded, or
  the code of a response_format that cannot be enforced (invalid_schema, ...);
- worker: the job ends `failed` with a stable code, alone (its batch neighbours succeed);
- queue: a raw message that is not ours (pickle, garbage, unknown job) is refused or dropped,
  nothing is executed, and the next job is served.
Callback URLs that point at private or metadata addresses are refused at delivery
(dead-lettered, never requested) while the job itself succeeds.
One in-process worker (tests/harness.running_worker) serves the whole module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from api_client import JobClient, JobRequest, RequestRejected, keys
from api_client.schema import MAX_MEDIA_ITEMS, MAX_REQUEST_BYTES, MAX_TEXT_CHARS
from api_client.webhooks import generate_secret
from model_runtime.samples import make_sample_image, make_sample_video
from tests.faults import corpus as C
from tests.faults.common import record, wait_all
from tests.harness import running_worker
from worker.jobs.callbacks import list_dead
from worker.ops.embedded import EmbeddedRedis
from worker.settings import Settings

MEDIA, RESULTS = "bad-media", "bad-results"


@pytest.fixture(scope="module")
def svc(s3_server, model_cache, tmp_path_factory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("bad-inputs")
    server = EmbeddedRedis(base / "redis")
    s3 = s3_server.client()
    for b in (MEDIA, RESULTS):
        s3.create_bucket(Bucket=b)
    media_root = base / "media"
    media_root.mkdir()
    settings = Settings(
        redis_url=server.url, data_dir=base / "data", store_url=f"s3://{RESULTS}/ivq",
        s3_endpoint_url=s3_server.endpoint_url, s3_allowed_buckets=[MEDIA], model="tiny",
        model_cache_dir=model_cache, allowed_file_root=media_root, allow_https_media=False,
        callback_allow_private=False, webhook_secret=generate_secret(), max_batch_size=8, max_wait_ms=100,
        concurrency=16, lease_s=20,
    )
    with running_worker(settings) as runtime:
        client = JobClient(server.url)
        yield {"s3": s3, "client": client, "runtime": runtime, "media_root": media_root, "base": base}
        client.close()
    server.stop()


def put(s3, key: str, data: bytes) -> str:
    s3.put_object(Bucket=MEDIA, Key=key, Body=data)
    return f"s3://{MEDIA}/{key}"


def submit_cases() -> dict[str, object]:
    ok_image = C.image(f"s3://{MEDIA}/good.jpg")
    return {
        "malformed JSON": '{"messages": [{"role": "user", "content": "hi"}',
        "unknown top-level field": {**C.user(C.text("hi")), "surprise": 1},
        "unknown item field (uri)": C.user({"type": "image", "uri": "s3://b/k.jpg"}),
        "unknown content type": C.user({"type": "audio", "url": "s3://b/k.wav"}),
        "wrong type: max_new_tokens str": {**C.user(C.text("hi")), "generation": {"max_new_tokens": "many"}},
        "wrong type: messages str": {"messages": "hello"},
        "wrong type: text is a number": C.user({"type": "text", "text": 42}),
        "max_new_tokens out of range": {**C.user(C.text("hi")), "generation": {"max_new_tokens": 100_000}},
        "no messages": {"messages": []},
        "no user turn": {"messages": [{"role": "system", "content": "be brief"}]},
        f"too many items ({MAX_MEDIA_ITEMS + 1} images)": C.user(*[ok_image] * (MAX_MEDIA_ITEMS + 1), C.text("x")),
        "text over the char limit": C.user(C.text("x" * (MAX_TEXT_CHARS + 1))),
        "request over the byte limit": json.dumps({**C.user(C.text("hi")), "pad": "x" * MAX_REQUEST_BYTES}),
        "url scheme ftp://": C.user(C.image("ftp://example.com/a.jpg"), C.text("x")),
        "s3 url without a key": C.user(C.image(f"s3://{MEDIA}"), C.text("x")),
        "path traversal in s3 key": C.user(C.image(f"s3://{MEDIA}/a/../../etc/passwd"), C.text("x")),
        "path traversal in file url": C.user(C.image("file:///srv/media/../../etc/passwd"), C.text("x")),
        "callback url file://": {**C.user(C.text("hi")), "callback": {"url": "file:///etc/passwd"}},
        "video num_frames 1000": C.user(C.video(f"s3://{MEDIA}/ok.mp4", num_frames=1000), C.text("x")),
        "priority 10": {**C.user(C.text("hi")), "priority": 10},
    }


def worker_cases(s3, media_root) -> dict[str, tuple[dict, str]]:
    """name -> (request, expected error code); media is uploaded here."""
    bomb = put(s3, "bomb.png", C.png_bomb())
    huge = put(s3, "huge.jpg", C.jpeg_huge_header())
    trunc = put(s3, "truncated.jpg", C.truncated_jpeg())
    text_jpg = put(s3, "script.jpg", C.not_an_image())
    zero = put(s3, "zero-frames.mp4", C.zero_frame_mp4())
    corrupt = put(s3, "corrupt.mp4", C.corrupt_mp4())
    trunc_mp4 = put(s3, "truncated.mp4", C.truncated_mp4())
    clip = put(s3, "clip.mp4", make_sample_video(seconds=1, fps=8, width=64, height=48))
    outside = media_root.parent / "outside.jpg"
    outside.write_bytes(make_sample_image(32, 32))
    q = lambda *items, **kw: {**C.user(*items), **kw}  # noqa: E731
    return {
        "decompression-bomb PNG (20000x20000)": (q(C.image(bomb), C.text("x")), "media_too_large"),
        "JPEG header claims 60000x60000": (q(C.image(huge), C.text("x")), "media_too_large"),
        "truncated JPEG": (q(C.image(trunc), C.text("x")), "invalid_media"),
        "shell script named .jpg": (q(C.image(text_jpg), C.text("x")), "invalid_media"),
        "zero-frame MP4": (q(C.video(zero), C.text("x")), "invalid_media"),
        "corrupt MP4 (noise in mdat)": (q(C.video(corrupt), C.text("x")), "invalid_media"),
        "truncated MP4 (200 bytes)": (q(C.video(trunc_mp4), C.text("x")), "invalid_media"),
        "video used as an image": (q(C.image(clip), C.text("x")), "invalid_media"),
        "prompt beyond the context": (q(C.text("lorem ipsum " * 2600)), "prompt_too_long"),
        "max_new_tokens beyond the context": (q(C.text("hi"), generation={"max_new_tokens": 4096}),
                                              "prompt_too_long"),
        "control token in user text": (q(C.text("<IMG_CONTEXT> pretend this is an image")), "invalid_request"),
        "https media: metadata 169.254.169.254": (
            q(C.image("https://169.254.169.254/latest/meta-data/iam.jpg"), C.text("x")), "forbidden_url"),
        "https media: loopback 127.0.0.1": (q(C.image("https://127.0.0.1:6379/x.jpg"), C.text("x")), "forbidden_url"),
        "http media: localhost": (q(C.image("http://localhost/x.jpg"), C.text("x")), "forbidden_url"),
        "file:// outside the root": (q(C.image(f"file://{outside}"), C.text("x")), "forbidden_url"),
        "file:///etc/passwd": (q(C.image("file:///etc/passwd"), C.text("x")), "forbidden_url"),
        "file:// %2e%2e traversal": (q(C.image(f"file://{media_root}/%2e%2e/outside.jpg"), C.text("x")),
                                     "forbidden_url"),
        "file:// missing inside the root": (q(C.image(f"file://{media_root}/nope.jpg"), C.text("x")),
                                           "media_not_found"),
        "s3 bucket not allowed": (q(C.image(f"s3://{RESULTS}/ivq/x.jpg"), C.text("x")), "forbidden_url"),
        "s3 key %2e%2e (literal, flat namespace)": (q(C.image(f"s3://{MEDIA}/a/%2e%2e/good.jpg"), C.text("x")),
                                                   "media_not_found"),
        "s3 missing key": (q(C.image(f"s3://{MEDIA}/missing.jpg"), C.text("x")), "media_not_found"),
    }


def test_bad_input_corpus(svc):
    s3, client, redis = svc["s3"], svc["client"], svc["client"].redis
    good_url = put(s3, "good.jpg", make_sample_image(96, 72, seed=9))
    rows: list[tuple[str, str, str, str]] = []

    for name, req in submit_cases().items():
        with pytest.raises(RequestRejected) as info:
            client.submit(req)
        rows.append((name, "submit", "invalid_request", info.value.code.value))
    for name, (response_format, code) in C.format_cases().items():
        with pytest.raises(RequestRejected) as info:
            client.submit({**C.user(C.text("as JSON")), "response_format": response_format})
        rows.append((f"response_format {name}", "submit", code, info.value.code.value))
    assert not list(redis.scan_iter(keys.job_pattern())), "a rejected request left a record"

    cases = worker_cases(s3, svc["media_root"])
    neighbour = JobRequest.simple("neighbour", images=[good_url], generation={"max_new_tokens": 4})
    ids, neighbours = {}, []
    for i, (name, (req, _code)) in enumerate(cases.items()):
        ids[name] = client.submit(req)
        if i % 3 == 0:  # good jobs interleaved, so bad ones share batches with them
            neighbours.append(client.submit(neighbour))
    final = wait_all(client, list(ids.values()) + neighbours, timeout=120)
    for name, (_req, code) in cases.items():
        s = final[ids[name]]
        rows.append((name, "worker", code, s.error.code.value if s.error else s.state.value))
        assert s.state.value == "failed" and s.attempts == 1, (name, s)
    assert all(final[j].state.value == "succeeded" for j in neighbours)

    rows += queue_cases(svc, good_url)
    rows += callback_cases(svc)
    rows += api_cases(svc)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'case':<{width}}  where     expected          got")
    for name, where, expected, got in rows:
        print(f"{name:<{width}}  {where:<8}  {expected:<16}  {got}{'' if got == expected else '   <-- MISMATCH'}")
    assert [r for r in rows if r[2] != r[3]] == []
    record(f"bad inputs: {len(rows)} cases ({sum(r[1] == 'submit' for r in rows)} at submit, "
           f"{sum(r[1] == 'worker' for r in rows)} in the worker, {sum(r[1] == 'queue' for r in rows)} raw "
           f"queue messages, {sum(r[1] == 'callback' for r in rows)} callback URLs, "
           f"{sum(r[1] == 'api' for r in rows)} to the HTTP API), all with the expected "
           f"outcome; {len(neighbours)} interleaved good jobs succeeded")


def queue_cases(svc, good_url: str) -> list[tuple[str, str, str, str]]:
    """Raw messages pushed onto the infer list; after each, a good job must still be served."""
    client, redis = svc["client"], svc["client"].redis
    marker = svc["base"] / "pickle-was-loaded"
    messages = {
        "pickle-serialized Celery message": C.pickle_message(marker),
        "JSON content-type, body not JSON": C.raw_message("bm90IGpzb24gYXQgYWxs", "application/json"),
        "JSON task for an unknown job id": C.json_task_message(["no-such-job"]),
        "JSON task with a non-string job id": C.json_task_message([{"$ne": None}]),
        "unknown task name": C.raw_message("W1tdLCB7fSwge31d", "application/json", task="os.system"),
    }
    rows = []
    for name, raw in messages.items():
        redis.lpush(keys.INFER_QUEUE, raw)
        after = client.submit(JobRequest.simple("after a bad message", images=[good_url],
                                                generation={"max_new_tokens": 2}))
        served = client.wait(after, timeout=60).state.value == "succeeded"
        left = redis.llen(keys.INFER_QUEUE)
        got = "refused, still serving" if served and left == 0 and not marker.exists() else \
            f"served={served} left={left} pickle_loaded={marker.exists()}"
        rows.append((name, "queue", "refused, still serving", got))
    assert not marker.exists(), "a pickle payload was deserialized"
    return rows


def callback_cases(svc) -> list[tuple[str, str, str, str]]:
    """SSRF through callback URLs: the job succeeds, the delivery is refused and dead-lettered."""
    client, redis = svc["client"], svc["client"].redis
    urls = {
        "callback to 169.254.169.254 (metadata)": "http://169.254.169.254/latest/meta-data/",
        "callback to loopback 127.0.0.1": "http://127.0.0.1:6379/",
        "callback to localhost": "http://localhost:8080/hook",
        "callback to 10.0.0.1 (private)": "http://10.0.0.1/hook",
        "callback to [::1]": "http://[::1]:80/hook",
    }
    ids = {name: client.submit({**C.user(C.text("cb")), "callback": {"url": url}}) for name, url in urls.items()}
    final = wait_all(client, list(ids.values()), timeout=60)
    deadline = time.monotonic() + 30
    dead: dict[str, str] = {}
    while len(dead) < len(ids) and time.monotonic() < deadline:
        dead = {e["delivery"]["job_id"]: e["reason"] for e in list_dead(redis, limit=1000)}
        time.sleep(0.2)
    rows = []
    for name, job_id in ids.items():
        ok = final[job_id].state.value == "succeeded" and dead.get(job_id, "").startswith("forbidden url")
        rows.append((name, "callback", "job ok, refused", "job ok, refused" if ok else
                     f"{final[job_id].state.value}, {dead.get(job_id)}"))
    return rows


def test_deadline_passed_while_queued_expires_without_running(svc):
    client = svc["client"]
    job_id = "deadline-demo"
    client.jobs.create(job_id, JobRequest.simple("late").model_dump_json(), now=time.time(), priority=0,
                                 deadline=time.time() + 0.3, idempotency_key=None)
    time.sleep(0.6)  # the deadline passes while the job sits in the queue
    client.dispatch.run_job(job_id)
    s = client.wait(job_id, timeout=30)
    assert s.state.value == "failed" and s.error.code.value == "expired"
    assert s.attempts == 0 and s.started_at is None  # never claimed, never reached the model
    assert [e["state"] for e in client.jobs.events(job_id)] == ["queued", "failed"]


def test_cancel_a_running_job_discards_its_result(svc):
    client, runtime, s3 = svc["client"], svc["runtime"], svc["s3"]
    job_id = client.submit(JobRequest.simple("long one", generation={"max_new_tokens": 1500}))
    for ev in client.events(job_id, timeout=30):
        if ev["state"] == "running":
            break
    cancelled = client.cancel(job_id)
    assert cancelled.state.value == "cancelled" and cancelled.error.code.value == "cancelled"
    deadline = time.monotonic() + 60  # the generate call is not interrupted; wait for the task to let go
    while b"ivq_jobs_in_flight 0.0" not in runtime.metrics.render():
        assert time.monotonic() < deadline, "the cancelled job never left the worker"
        time.sleep(0.1)
    s = client.status(job_id)
    assert s.state.value == "cancelled" and client.result(job_id) is None and s.result_url is None
    assert [e["state"] for e in client.jobs.events(job_id)] == ["queued", "running", "cancelled"]
    listed = s3.list_objects_v2(Bucket=RESULTS, Prefix=f"ivq/results/internal/{job_id}").get("KeyCount", 0)
    assert listed == 0, "a cancelled job's result was written to the store"


def api_cases(svc) -> list[tuple[str, str, str, str]]:
    """Bad calls to the HTTP API: each answers its status and stable code, and records nothing."""
    import httpx

    from worker.http.app import create_api
    from worker.ops.embedded import serve_in_thread
    from worker.http.batch_routes import BatchRoutes
    from worker.io.results_store import open_store
    from worker.http.tenants import TenantRegistry, new_key

    mine, theirs = new_key(), new_key()
    tenants = TenantRegistry.for_keys({"mine": mine, "theirs": theirs})
    client = svc["client"]
    other_job = client.submit(JobRequest.simple("theirs"), tenant="theirs")
    expected_formats: dict[str, str] = {}
    ok = C.user(C.text("hi"))
    cases: dict[str, tuple[str, str, dict]] = {
        "no Authorization header": ("POST", "/v1/jobs", {"json": ok, "key": None}),
        "forged key": ("POST", "/v1/jobs", {"json": ok, "key": "ivq_" + "x" * 43}),
        "Basic instead of Bearer": ("POST", "/v1/jobs", {"json": ok, "auth": "Basic bWU6cGFzcw=="}),
        "body not JSON": ("POST", "/v1/jobs", {"content": b"{nope"}),
        "body a JSON array": ("POST", "/v1/jobs", {"json": [ok]}),
        "body over the limit": ("POST", "/v1/jobs", {"content": b"{" + b" " * (MAX_REQUEST_BYTES + 10) + b"}"}),
        "unknown field": ("POST", "/v1/jobs", {"json": {**ok, "surprise": 1}}),
        "Idempotency-Key with spaces": ("POST", "/v1/jobs", {"json": ok, "headers": {"Idempotency-Key": "a b"}}),
        "another tenant's job": ("GET", f"/v1/jobs/{other_job}", {}),
        "another tenant's job, cancel": ("POST", f"/v1/jobs/{other_job}/cancel", {}),
        "a job id with ../": ("GET", "/v1/jobs/..%2F..%2Fetc", {}),
        "batch: empty file": ("POST", "/v1/native/batches", {"content": b"\n\n", "type": "application/jsonl"}),
        "batch: one line not JSON": ("POST", "/v1/native/batches", {"content": b"{\n", "type": "application/jsonl"}),
        "batch: input_url file:///etc/passwd": ("POST", "/v1/native/batches", {"json": {"input_url": "file:///etc/passwd"}}),
    }
    for name, (response_format, code) in C.format_cases().items():  # 422 with the format's own code
        cases[f"response_format {name}"] = ("POST", "/v1/jobs", {"json": {**ok, "response_format": response_format}})
        expected_format = f"422 {code}"
        cases[f"batch line: response_format {name}"] = ("POST", "/v1/native/batches", {"content": json.dumps(
            {"custom_id": "a", "request": {**ok, "response_format": response_format}}).encode() + b"\n",
            "type": "application/jsonl"})
        expected_formats[f"response_format {name}"] = expected_format
        expected_formats[f"batch line: response_format {name}"] = "422 invalid_request"
    expected: dict[str, str] = {"no Authorization header": "401 unauthorized", "forged key": "401 unauthorized",
                "Basic instead of Bearer": "401 unauthorized", "body not JSON": "400 invalid_request",
                "body a JSON array": "400 invalid_request", "body over the limit": "413 invalid_request",
                "unknown field": "422 invalid_request", "Idempotency-Key with spaces": "422 invalid_request",
                "another tenant's job": "404 not_found", "another tenant's job, cancel": "404 not_found",
                "a job id with ../": "404 not_found", "batch: empty file": "422 invalid_request",
                "batch: one line not JSON": "422 invalid_request",
                "batch: input_url file:///etc/passwd": "422 forbidden_url", **expected_formats}
    before = len(list(client.redis.scan_iter(keys.job_pattern())))
    routes = BatchRoutes(open_store(f"file://{svc['base'] / 'api-store'}"), max_body_bytes=1024 * 1024)
    rows = []
    with serve_in_thread(create_api(client.redis_url, tenants, batches=routes)) as base, \
            httpx.Client(base_url=base) as http:
        for name, (method, path, kw) in cases.items():
            key = kw.get("key", mine)
            headers = {**kw.get("headers", {}), **({"Authorization": kw.get("auth") or f"Bearer {key}"}
                                                   if key or kw.get("auth") else {})}
            if "content" in kw:
                headers["Content-Type"] = kw.get("type", "application/json")
            response = http.request(method, path, headers=headers, json=kw.get("json"), content=kw.get("content"))
            got = f"{response.status_code} {response.json().get('error', {}).get('code')}"
            rows.append((name, "api", expected[name], got))
    assert len(list(client.redis.scan_iter(keys.job_pattern()))) == before, "a refused call left a record"
    assert client.status(other_job).state.value in ("queued", "running", "succeeded")  # untouched
    return rows
