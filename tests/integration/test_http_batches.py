"""Batch files through the HTTP API: checked line by line, run at batch priority, one
results file in input order and one completion callback. Real uvicorn, redis-server,
an in-process worker (tiny model: gibberish text by design)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from api_client import HttpJobClient, JobRequest, keys
from api_client.errors import JobNotFound, RequestRejected
from tests.faults.netfaults import WebhookReceiver
from tests.harness import running_worker
from worker.http.app import create_api
from worker.ops.embedded import serve_in_thread
from worker.http.batch_routes import BatchRoutes
from worker.io.results_store import open_store
from worker.settings import Settings
from worker.http.tenants import TenantRegistry, new_key

ACME, GLOBEX = new_key(), new_key()
SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="


def registry() -> TenantRegistry:
    return TenantRegistry.for_keys({"acme": ACME, "globex": GLOBEX})


def line(i: int, **kw) -> dict:
    request = JobRequest.simple(f"item {i}", generation={"max_new_tokens": 2}).model_dump(mode="json")
    return {"custom_id": f"c-{i}", "request": request, **kw}


@pytest.fixture(scope="module")
def api(redis_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("batches")
    settings = Settings(redis_url=redis_url, data_dir=data, model="tiny", model_cache_dir=data.parent / "models-cache",
                        max_batch_size=16, concurrency=32, lease_s=2, visibility_timeout_s=30, job_timeout_s=20,
                        webhook_secret=SECRET, callback_allow_private=True)
    store = open_store(settings.resolved_store_url)
    routes = BatchRoutes(store, max_body_bytes=settings.api_max_batch_bytes)
    with running_worker(settings), serve_in_thread(create_api(redis_url, registry(), batches=routes)) as base:
        yield base


def _wait_completed(client: HttpJobClient, batch_id: str, timeout: float = 240) -> dict:
    end = time.monotonic() + timeout
    while (status := client.batch(batch_id))["state"] != "completed":
        assert time.monotonic() < end, status
        time.sleep(0.5)
    return status


def test_three_bad_lines_refuse_the_file_and_create_nothing(api, redis_client):
    lines = [json.dumps(line(i)) for i in range(100)]
    lines[9] = "{not json"
    lines[41] = json.dumps({"custom_id": "c-41", "request": {"messages": []}})
    lines[77] = json.dumps(line(3))  # repeats custom_id c-3
    before = len(list(redis_client.scan_iter(keys.job_pattern())))
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {ACME}"}) as http:
        refused = http.post("/v1/native/batches", content="\n".join(lines),
                            headers={"Content-Type": "application/jsonl"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"
    assert [x["line"] for x in refused.json()["lines"]] == [10, 42, 78]
    assert len(list(redis_client.scan_iter(keys.job_pattern()))) == before
    with HttpJobClient(api, ACME) as client:
        accepted = client.submit_batch("\n".join(lines), partial=True)
        assert accepted["accepted"] == 97 and [x["line"] for x in accepted["rejected"]] == [10, 42, 78]
        status = _wait_completed(client, accepted["batch_id"])
        assert status["counts"]["succeeded"] == 97 and status["rejected_lines"] == 3
        with pytest.raises(RequestRejected):
            client.submit_batch("\n".join(lines))


def test_two_thousand_lines_give_one_results_file_in_input_order(api):
    receiver = WebhookReceiver(SECRET)
    receiver.up()
    try:
        with HttpJobClient(api, ACME) as client:
            started = time.monotonic()
            accepted = client.submit_batch((line(i) for i in range(2000)), callback_url=receiver.url)
            accept_s = time.monotonic() - started
            batch_id = accepted["batch_id"]
            assert accepted["accepted"] == 2000
            status = _wait_completed(client, batch_id)
            results = list(client.batch_results(batch_id))
            end = time.monotonic() + 20
            while not receiver.snapshot() and time.monotonic() < end:
                time.sleep(0.1)
        print(f"batch: 2000 lines accepted in {accept_s:.2f}s, completed in {time.monotonic() - started:.1f}s")
        assert status["counts"]["succeeded"] == 2000
        assert [r["custom_id"] for r in results] == [f"c-{i}" for i in range(2000)]  # input order, once each
        assert all(r["state"] == "succeeded" and isinstance(r["output"], str) and r["usage"] for r in results)
        posts = receiver.snapshot()
        assert [d.event_type for d in posts] == ["batch.completed"] and posts[0].verified
    finally:
        receiver.close()


def test_another_tenants_batch_is_not_found(api):
    with HttpJobClient(api, ACME) as acme, HttpJobClient(api, GLOBEX) as globex:
        batch_id = acme.submit_batch([line(1)])["batch_id"]
        with pytest.raises(JobNotFound):
            globex.batch(batch_id)
        with pytest.raises(JobNotFound):
            list(globex.batch_results(batch_id))
        assert acme.batch(batch_id)["total"] == 1


def test_the_cli_submits_follows_and_fetches_a_batch(api, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line(i)) + "\n" for i in range(30)))
    cli = [sys.executable, "-m", "worker.cli", "batch"]
    auth = ["--api-url", api, "--api-key", ACME]
    submitted = subprocess.run(cli + ["submit", str(path), "--wait", "--json", *auth], capture_output=True,
                               text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stderr
    first, last = (json.loads(x) for x in submitted.stdout.strip().splitlines())
    assert first["accepted"] == 30 and last["state"] == "completed" and last["counts"]["succeeded"] == 30
    assert "job" in submitted.stderr  # the progress bar
    out = tmp_path / "out.jsonl"
    fetched = subprocess.run(cli + ["results", first["batch_id"], "-o", str(out), *auth], capture_output=True,
                             text=True, timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [f"c-{i}" for i in range(30)]


def test_results_before_the_batch_completes_are_a_conflict(api, redis_url, redis_client):
    from api_client import JobClient

    long = {"custom_id": "long", "request": JobRequest.simple(
        "go on", generation={"max_new_tokens": 4000, "min_new_tokens": 4000}).model_dump(mode="json")}
    with HttpJobClient(api, ACME) as client, JobClient(redis_url) as direct:
        batch_id = client.submit_batch([long])["batch_id"]
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {ACME}"}) as http:
            early = http.get(f"/v1/native/batches/{batch_id}/results")
        assert (early.status_code, early.json()["error"]["code"]) == (409, "conflict")
        [row] = redis_client.lrange(keys.BatchKeys.of(batch_id).jobs, 0, -1)
        direct.cancel(row.decode().split("\t")[1])  # the batch ends with its one job cancelled
        status = _wait_completed(client, batch_id, timeout=60)
        [result] = client.batch_results(batch_id)
    assert status["counts"]["cancelled"] == 1
    assert (result["state"], result["error"]["code"], result["output"]) == ("cancelled", "cancelled", None)


def test_batch_lines_carry_a_response_format_and_the_results_its_json(api):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    formats = [{"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}},
               {"type": "choice", "choices": ["yes", "no"]}, None]
    lines = []
    for i, fmt in enumerate(formats):
        entry = line(i)
        entry["request"]["generation"]["max_new_tokens"] = 32
        if fmt is not None:
            entry["request"]["response_format"] = fmt
        lines.append(entry)
    with HttpJobClient(api, ACME) as client:
        accepted = client.submit_batch(lines)
        _wait_completed(client, accepted["batch_id"])
        results = {r["custom_id"]: r for r in client.batch_results(accepted["batch_id"])}
    assert results["c-0"]["output_complete"] and results["c-0"]["output_json"] == json.loads(results["c-0"]["output"])
    assert results["c-1"]["output_complete"] and results["c-1"]["output"] in ("yes", "no")
    assert "output_json" not in results["c-1"] or results["c-1"]["output_json"] is None
    assert "output_complete" not in results["c-2"]
