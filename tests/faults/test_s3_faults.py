"""Object-store faults through a proxy in front of the S3 server: retries, and their limits.

The worker's S3 endpoint is the fault proxy (tests/faults/netfaults.py). boto3
makes up to 4 requests per call itself (3 retries); faults beyond that reach the job,
which goes back to the queue with backoff (one attempt counted) and ends
`storage_unavailable` after IVQ_MAX_ATTEMPTS. A missing object is not a
transient fault: it fails at once with media_not_found, after one request.
"""

from __future__ import annotations

from api_client import JobRequest
from api_client.schema import ErrorCode
from model_runtime.samples import make_sample_image
from tests.faults.common import record, wait_all
from tests.faults.netfaults import S3FaultProxy

MEDIA, RESULTS = "faults-media", "faults-results"

# name -> (faults for the first requests of that object, expected state, expected attempts, expected code)
CASES = {
    "clean": ([], "succeeded", 1, None),
    "slow": (["slow"], "succeeded", 1, None),
    "absorbed-by-boto": (["503", "reset", "503"], "succeeded", 1, None),
    "503-beyond-boto": (["503"] * 4, "succeeded", 2, None),
    "reset-beyond-boto": (["reset"] * 4, "succeeded", 2, None),
    "mixed-beyond-boto": (["reset", "503", "reset", "503", "slow"], "succeeded", 2, None),
    "down-for-good": (["503"] * 12, "failed", 3, ErrorCode.storage_unavailable),
}


def test_s3_faults_are_retried_within_limits_and_404_fails_at_once(s3_server, redis_srv, client, spawn):
    s3 = s3_server.client()
    for b in (MEDIA, RESULTS):
        s3.create_bucket(Bucket=b)
    proxy = S3FaultProxy(s3_server.endpoint_url, slow_s=1.5)
    worker = spawn("s3", store_url=f"s3://{RESULTS}/ivq", s3_endpoint_url=proxy.endpoint_url, max_batch_size=4,
                   max_wait_ms=50, lease_s=10, max_attempts=3)
    image = make_sample_image(96, 64, seed=5)
    for name, (faults, *_rest) in CASES.items():
        s3.put_object(Bucket=MEDIA, Key=f"{name}.jpg", Body=image)
        proxy.plan(MEDIA, f"{name}.jpg", faults)
    worker.wait_ready(redis_srv.url)

    gen = {"max_new_tokens": 4}
    ids = {name: client.submit(JobRequest.simple(name, images=[f"s3://{MEDIA}/{name}.jpg"], generation=gen))
           for name in CASES}
    ids["missing"] = client.submit(JobRequest.simple("missing", images=[f"s3://{MEDIA}/nope.jpg"], generation=gen))
    final = wait_all(client, list(ids.values()), timeout=120)

    # The result write is faulted too: the first one fails past boto's retries.
    proxy.plan_prefix(RESULTS, "ivq/results/", ["503"] * 4)
    put_faulted = client.submit(JobRequest.simple("result write faulted", generation=gen))
    final[put_faulted] = client.wait(put_faulted, timeout=60)

    rows = []
    for name, (faults, state, attempts, code) in CASES.items():
        s = final[ids[name]]
        rows.append((name, " ".join(faults) if len(faults) < 6 else f"503 x{len(faults)}", s.state.value,
                     s.attempts, s.error.code.value if s.error else "-"))
        assert (s.state.value, s.attempts) == (state, attempts), (name, s)
        assert (s.error.code if s.error else None) == code, (name, s.error)
    missing = final[ids["missing"]]
    assert missing.state.value == "failed" and missing.error.code is ErrorCode.media_not_found
    assert missing.attempts == 1 and proxy.requests[f"GET /{MEDIA}/nope.jpg"] == 1
    assert proxy.requests[f"GET /{MEDIA}/down-for-good.jpg"] == 12  # 3 attempts x 4 requests, then no more
    written = final[put_faulted]
    assert written.state.value == "succeeded" and written.attempts == 2, written
    assert s3.get_object(Bucket=RESULTS, Key=f"ivq/results/internal/{put_faulted}.json")["ContentLength"] > 0
    proxy.close()

    print(f"\n{'case':<18} {'faults (per request, in order)':<32} {'state':<10} attempts  code")
    for row in rows:
        print(f"{row[0]:<18} {row[1]:<32} {row[2]:<10} {row[3]:>8}  {row[4]}")
    record(f"s3 faults: {len(ids) + 1} jobs, faults injected {dict(proxy.injected)}; "
           f"retried and succeeded {sum(1 for r in rows if r[2] == 'succeeded' and r[3] > 1) + 1}, "
           f"gave up after 3 attempts 1 (storage_unavailable), 404 -> media_not_found after 1 request")
