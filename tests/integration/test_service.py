"""The whole path with real things: JobClient -> redis-server -> Celery worker
(threads pool, continuous engine, tiny InternVL) -> moto S3 over HTTP -> status.

The tiny model's text is random by design; the assertions are about the
service: states, stored results, batching, error codes, isolation.
"""

from __future__ import annotations

import json
import time

import pytest

from api_client import JobClient, JobRequest, RequestRejected
from api_client.schema import ErrorCode
from model_runtime.samples import make_sample_image, make_sample_video
from tests.harness import running_worker
from worker.settings import Settings

BUCKET = "media"
RESULTS = "results"


@pytest.fixture(scope="module")
def service(s3_server, redis_url, tmp_path_factory):
    """One in-process worker for the module, reading media from S3 and writing results there."""
    s3 = s3_server.client()
    for b in (BUCKET, RESULTS):
        s3.create_bucket(Bucket=b)
    data_dir = tmp_path_factory.mktemp("ivq")
    media_root = data_dir / "media"
    media_root.mkdir()
    settings = Settings(
        redis_url=redis_url, data_dir=data_dir, store_url=f"s3://{RESULTS}/ivq",
        s3_endpoint_url=s3_server.endpoint_url, model="tiny", model_cache_dir=data_dir.parent / "models-cache",
        max_batch_size=8, max_wait_ms=100, concurrency=16, lease_s=20, allowed_file_root=media_root,
        cancel_poll_s=0.2,
    )
    with running_worker(settings) as runtime:
        yield {"settings": settings, "s3": s3, "runtime": runtime, "media_root": media_root}


@pytest.fixture
def client(redis_url, service):
    c = JobClient(redis_url)
    yield c
    c.close()


def put(s3, key: str, data: bytes) -> str:
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def test_many_concurrent_jobs_all_succeed_with_results_in_s3_and_redis(service, client):
    s3 = service["s3"]
    img = put(s3, "photo.jpg", make_sample_image(320, 240, seed=1))
    img2 = put(s3, "photo2.png", make_sample_image(200, 300, seed=2, format="PNG"))
    vid = put(s3, "clip.mp4", make_sample_video(seconds=2, fps=8, width=96, height=64))
    requests = []
    for i in range(24):
        kind = i % 4
        images = [img] if kind == 1 else [img, img2] if kind == 2 else []
        videos = [vid] if kind == 3 else []
        requests.append(JobRequest.simple(f"describe item {i}", images=images, videos=videos,
                                          generation={"max_new_tokens": 8}, metadata={"i": str(i)}))
    ids = client.submit_many(requests)
    statuses = [client.wait(j, timeout=240) for j in ids]
    assert [s.state.value for s in statuses] == ["succeeded"] * 24, [s.error for s in statuses]
    sizes = []
    for job_id, req in zip(ids, requests, strict=True):
        result = client.result(job_id)
        assert result is not None and result.job_id == job_id
        assert 1 <= result.usage.completion_tokens <= 8
        assert result.metadata == req.metadata
        stored = json.loads(s3.get_object(Bucket=RESULTS, Key=f"ivq/results/internal/{job_id}.json")["Body"].read())
        assert stored["output_text"] == result.output_text
        assert client.status(job_id).result_url == f"s3://{RESULTS}/ivq/results/internal/{job_id}.json"
        sizes.append(result.batch_size)
    assert max(sizes) > 1, f"no batching observed: {sizes}"
    video_results = [client.result(j) for j, r in zip(ids, requests, strict=True) if any(
        c.type == "video" for m in r.messages for c in m.content)]
    assert all(r.usage.video_frames > 0 for r in video_results)


def test_corrupt_neighbour_fails_alone_and_missing_key_is_media_not_found(service, client):
    s3 = service["s3"]
    good = put(s3, "good.jpg", make_sample_image(128, 128, seed=3))
    bad = put(s3, "corrupt.jpg", b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
    ids = {
        "bad": client.submit(JobRequest.simple("x", images=[bad], generation={"max_new_tokens": 4})),
        "missing": client.submit(JobRequest.simple("x", images=[f"s3://{BUCKET}/nope.jpg"])),
    }
    ids.update({f"good{i}": client.submit(JobRequest.simple(f"y{i}", images=[good], generation={"max_new_tokens": 4}))
                for i in range(6)})
    done = {k: client.wait(v, timeout=120) for k, v in ids.items()}
    assert done["bad"].state.value == "failed" and done["bad"].error.code is ErrorCode.invalid_media
    assert done["missing"].state.value == "failed" and done["missing"].error.code is ErrorCode.media_not_found
    assert all(done[f"good{i}"].state.value == "succeeded" for i in range(6))


def test_file_urls_only_under_the_allowed_root(service, client, tmp_path):
    inside = service["media_root"] / "ok.jpg"
    inside.write_bytes(make_sample_image(64, 64))
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(make_sample_image(64, 64))
    ok = client.submit(JobRequest.simple("x", images=[f"file://{inside}"], generation={"max_new_tokens": 2}))
    no = client.submit(JobRequest.simple("x", images=[f"file://{outside}"]))
    assert client.wait(ok, timeout=60).state.value == "succeeded"
    failed = client.wait(no, timeout=60)
    assert failed.state.value == "failed" and failed.error.code is ErrorCode.forbidden_url


def test_malformed_request_is_refused_at_submit(client):
    with pytest.raises(RequestRejected) as info:
        client.submit({"messages": [{"role": "user", "content": [{"type": "image", "uri": "s3://b/k"}]}]})
    assert info.value.code == "invalid_request"
    with pytest.raises(RequestRejected):
        client.submit({"messages": [], "surprise": 1})


def test_cancel_a_queued_job_before_it_runs(service, client, redis_url):

    # A record with no Celery message yet: it stays queued until we cancel it.
    client.jobs.create("cancel-me", JobRequest.simple("x").model_dump_json(), now=time.time(), priority=0,
                   deadline=None, idempotency_key=None)
    status = client.cancel("cancel-me")
    assert status.state.value == "cancelled" and status.error.code is ErrorCode.cancelled
    client.dispatch.run_job("cancel-me")  # a late message for it is dropped by the claim
    time.sleep(1.0)
    assert client.status("cancel-me").state.value == "cancelled"
    assert client.result("cancel-me") is None


def test_a_running_job_cancelled_leaves_the_gpu_within_a_poll_and_a_step(service, client):
    engine = service["runtime"].model_thread.engine
    pinned = {"max_new_tokens": 4000, "min_new_tokens": 4000}  # thousands of decode steps each
    job_id = client.submit(JobRequest.simple("go on and on", generation=pinned))
    other = client.submit(JobRequest.simple("and so do I", generation=pinned))
    end = time.monotonic() + 60
    while engine.active < 2 and time.monotonic() < end:  # both decoding
        time.sleep(0.01)
    steps_at_cancel = engine.stats.decode_steps
    cancelled_at = time.monotonic()
    assert client.cancel(job_id).state.value == "cancelled"
    while engine.active > 1 and time.monotonic() < end:
        time.sleep(0.005)
    left_after_s = time.monotonic() - cancelled_at
    assert engine.active == 1 and left_after_s < 0.2 + 1.5, left_after_s  # the poll interval, a step, slack
    assert engine.stats.decode_steps - steps_at_cancel < 2000  # it did not decode on towards its 4000 tokens
    assert client.status(other).state.value == "running"  # its neighbour goes on
    assert client.status(job_id).state.value == "cancelled" and client.result(job_id) is None
    client.cancel(other)
    while engine.active and time.monotonic() < end:
        time.sleep(0.005)
    assert engine.active == 0 and client.result(other) is None


def test_idempotency_key_returns_the_same_job(service, client):
    req = JobRequest.simple("same", idempotency_key="order-42", generation={"max_new_tokens": 2})
    a, b = client.submit(req), client.submit(req)
    assert a == b
    assert client.wait(a, timeout=60).attempts == 1


def test_wait_times_out_cleanly(client):
    from api_client import WaitTimeout

    client.jobs.create("never-run", JobRequest.simple("x").model_dump_json(), now=time.time(),
                                 priority=0, deadline=None, idempotency_key=None)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout):
        client.wait("never-run", timeout=0.5)
    assert time.monotonic() - t0 < 3
    client.cancel("never-run")
