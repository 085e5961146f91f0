"""The HTTP API for real: uvicorn on loopback, a real redis-server, an in-process worker
(tiny model: its text is gibberish by design), httpx as the client."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from api_client import HttpJobClient, JobRequest, keys
from api_client.errors import JobNotFound, RateLimited, Unauthorized
from tests.harness import running_worker
from worker.http.app import create_api
from worker.ops.embedded import serve_in_thread
from worker.settings import Settings
from worker.http.tenants import TenantRegistry, key_hash, new_key

ACME, ACME_OLD, ACME_EXPIRED, GLOBEX, TIGHT, SLOW = (new_key() for _ in range(6))
LONG = {"max_new_tokens": 4000, "min_new_tokens": 4000}  # thousands of steps: it stays running until cancelled


def _keys_file(path) -> None:
    def entry(key, **kw):
        return {"sha256": key_hash(key), **kw}

    path.write_text(json.dumps({"tenants": {
        "acme": {"keys": [entry(ACME), entry(ACME_OLD), entry(ACME_EXPIRED, not_after="2001-01-01T00:00:00Z")]},
        "globex": {"keys": [entry(GLOBEX)]},
        "tight": {"keys": [entry(TIGHT)], "max_active": 2},
        "slow": {"keys": [entry(SLOW)], "rate_per_s": 0.2, "burst": 2},
    }}))


@pytest.fixture(scope="module")
def api(redis_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("api")
    keys_file = data / "api-keys.json"
    _keys_file(keys_file)
    settings = Settings(redis_url=redis_url, data_dir=data, model="tiny", model_cache_dir=data.parent / "models-cache",
                        max_batch_size=4, concurrency=8, cancel_poll_s=0.2)
    with running_worker(settings), serve_in_thread(create_api(redis_url, TenantRegistry(keys_file))) as base:
        yield base


def _http(base: str, key: str | None = ACME) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"} if key else {})


def _submit(http: httpx.Client, generation: dict | None = None, **headers: str) -> httpx.Response:
    body = JobRequest.simple("hello", generation=generation or {"max_new_tokens": 6}).model_dump(mode="json")
    return http.post("/v1/jobs", json=body, headers=headers)


def _error(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def test_a_job_end_to_end_with_status_result_and_events(api):
    with _http(api) as http, HttpJobClient(api, ACME) as client:
        created = _submit(http)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        # The status is read after the job was dispatched: a fast worker may have claimed it already.
        assert created.json()["status"]["state"] in ("queued", "running")
        kinds = [(kind, data.get("state")) for kind, data in client.events(job_id, timeout=60)]
        assert [s for k, s in kinds if k == "state"] == ["queued", "running", "succeeded"]
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
        result = http.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200 and result.json()["job_id"] == job_id
        joined = "".join(client.stream(job_id, timeout=30))  # a finished job's stream is its whole text
        assert joined == result.json()["output_text"]


def test_idempotency_key_header_maps_to_the_same_job(api):
    with _http(api) as http:
        first = _submit(http, **{"Idempotency-Key": "order-1"}).json()["job_id"]
        assert _submit(http, **{"Idempotency-Key": "order-1"}).json()["job_id"] == first
    with _http(api, GLOBEX) as other:  # another tenant's same key is its own job
        assert _submit(other, **{"Idempotency-Key": "order-1"}).json()["job_id"] != first


def test_another_tenants_job_is_not_found_for_every_verb(api):
    with _http(api) as acme, _http(api, GLOBEX) as globex:
        job_id = _submit(acme, LONG).json()["job_id"]
        unknown = "0" * 32
        for method, path in (("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/result"),
                             ("POST", "/v1/jobs/{}/cancel"), ("GET", "/v1/jobs/{}/events")):
            foreign = globex.request(method, path.format(job_id))
            missing = globex.request(method, path.format(unknown))
            assert (foreign.status_code, _error(foreign)) == (404, "not_found") == (missing.status_code,
                                                                                   _error(missing))
            assert foreign.json()["error"]["message"].replace(job_id, "ID") == \
                missing.json()["error"]["message"].replace(unknown, "ID")  # nothing tells the two apart
        assert acme.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running")  # untouched
        assert acme.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
        again = acme.post(f"/v1/jobs/{job_id}/cancel")
        assert (again.status_code, _error(again)) == (409, "conflict")
        no_result = acme.get(f"/v1/jobs/{job_id}/result")
        assert (no_result.status_code, _error(no_result)) == (409, "conflict")


def test_keys_missing_forged_expired_or_rotated(api):
    for key in (None, "ivq_forged", ACME_EXPIRED, "Basic abc"):
        with _http(api, key) as http:
            response = http.get("/v1/jobs/" + "0" * 32)
            assert (response.status_code, _error(response)) == (401, "unauthorized"), key
            assert response.headers["WWW-Authenticate"] == "Bearer"
    with _http(api, ACME_OLD) as old:  # both of acme's live keys work during a rotation
        assert _submit(old).status_code == 202
    with pytest.raises(Unauthorized), HttpJobClient(api, "ivq_forged") as forged:
        forged.status("0" * 32)


def test_malformed_and_oversized_bodies(api, redis_client):
    before = len(list(redis_client.scan_iter(keys.job_pattern())))
    with _http(api) as http:
        not_json = http.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
        assert (not_json.status_code, _error(not_json)) == (400, "invalid_request")
        not_object = http.post("/v1/jobs", json=[1, 2])
        assert (not_object.status_code, _error(not_object)) == (400, "invalid_request")
        invalid = http.post("/v1/jobs", json={"messages": [], "surprise": 1})
        assert (invalid.status_code, _error(invalid)) == (422, "invalid_request")
        huge = http.post("/v1/jobs", content=b"x" * (300 * 1024), headers={"Content-Type": "application/json"})
        assert (huge.status_code, _error(huge)) == (413, "invalid_request")
    assert len(list(redis_client.scan_iter(keys.job_pattern()))) == before  # nothing was recorded


def test_quota_gives_429_with_retry_after_and_enqueues_nothing(api, redis_client):
    with _http(api, TIGHT) as http:
        held = [_submit(http, LONG).json()["job_id"] for _ in range(2)]
        queued_before = sum(redis_client.llen(q) for q in keys.infer_queue_lists())
        jobs_before = len(list(redis_client.scan_iter(keys.job_pattern())))
        refused = _submit(http, LONG)
        assert (refused.status_code, _error(refused)) == (429, "quota_exceeded")
        assert int(refused.headers["Retry-After"]) >= 1
        assert len(list(redis_client.scan_iter(keys.job_pattern()))) == jobs_before
        assert sum(redis_client.llen(q) for q in keys.infer_queue_lists()) <= queued_before
        for job_id in held:
            http.post(f"/v1/jobs/{job_id}/cancel")
        assert _submit(http).status_code == 202  # room again once they ended


def test_rate_limit_gives_429_with_retry_after(api, redis_client):
    with _http(api, SLOW) as http:
        assert [_submit(http).status_code for _ in range(2)] == [202, 202]  # the burst
        jobs_before = len(list(redis_client.scan_iter(keys.job_pattern())))
        refused = _submit(http)
        assert (refused.status_code, _error(refused)) == (429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 6  # one token at 0.2/s
        assert len(list(redis_client.scan_iter(keys.job_pattern()))) == jobs_before
    with pytest.raises(RateLimited) as info, HttpJobClient(api, SLOW) as client:
        client.submit(JobRequest.simple("again"))
    assert info.value.retry_after_s >= 1


def test_events_resume_after_a_dropped_connection(api):
    with _http(api) as http:
        job_id = _submit(http, {"max_new_tokens": 40}).json()["job_id"]
        seen: list[tuple[str, str]] = []
        last_id = None
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:  # read one event, then drop
            for line in response.iter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                elif line.startswith("data: ") and last_id:
                    seen.append((last_id, line))
                    break
        assert last_id == "1:0"
        states, text, kind = [], "", ""
        with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_id},
                         timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if kind == "state":
                        states.append(data["state"])
                    else:
                        text += data["text"]
        assert states == ["running", "succeeded"]  # queued, seen before the drop, is not sent again
        assert text == http.get(f"/v1/jobs/{job_id}/result").json()["output_text"]


def test_probes_metrics_and_openapi(api):
    with httpx.Client(base_url=api, timeout=10) as http:
        assert http.get("/healthz").json() == {"ok": True}
        assert http.get("/readyz").status_code == 200
        assert "ivq_api_requests_total" in http.get("/metrics").text
        spec = http.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/cancel",
                "/v1/jobs/{job_id}/events"} <= set(spec["paths"])
        assert "quota_exceeded" in spec["info"]["description"]
        assert http.get("/docs").status_code == 200


def test_http_client_errors_match_the_direct_clients(api):
    with HttpJobClient(api, ACME) as client:
        with pytest.raises(JobNotFound):
            client.status("f" * 32)
        job_id = client.submit(JobRequest.simple("quick", generation={"max_new_tokens": 3}))
        assert client.wait(job_id, timeout=60).state.value == "succeeded"
        assert client.result(job_id).job_id == job_id
        time.sleep(0)  # the client is reusable after a stream
        assert client.cancel(job_id).state.value == "succeeded"  # already ended: says how
