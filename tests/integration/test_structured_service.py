"""Structured output through the whole service: a real in-process worker (tiny model), a real
redis-server, the HTTP API on loopback, JobClient, HttpJobClient and the CLI.

The tiny model's text is gibberish by design; what it writes under a response_format is
valid by construction, and checked here with `jsonschema`.
"""

from __future__ import annotations

import json
import uuid
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api_client import HttpJobClient, JobClient, JobRequest, RequestRejected, keys
from tests.faults import corpus as C
from tests.harness import running_worker
from tests.structured_cases import PRODUCT, check_output, response_formats
from worker.http.app import create_api
from worker.ops.embedded import serve_in_thread
from worker.settings import Settings
from worker.http.tenants import TenantRegistry, new_key

KEY = new_key()
FORMATS = response_formats()
CLI = [sys.executable, "-m", "worker.cli"]


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("structured")
    settings = Settings(redis_url=redis_url, data_dir=data, model="tiny", model_cache_dir=data.parent / "models-cache",
                        max_batch_size=8, concurrency=16)
    with running_worker(settings), serve_in_thread(create_api(redis_url, TenantRegistry.for_keys({"acme": KEY}))) \
            as base, JobClient(redis_url) as client:
        yield {"client": client, "base": base, "data": data, "redis_url": redis_url}


def request(response_format: dict | None, n: int = 0, max_new_tokens: int = 64) -> dict:
    body = JobRequest.simple(f"Describe the product #{n}.", generation={"max_new_tokens": max_new_tokens})
    data = body.model_dump(mode="json", exclude_none=True)
    if response_format is not None:
        data["response_format"] = response_format
    return data


def test_every_format_end_to_end_beside_free_jobs(service):
    client: JobClient = service["client"]
    ids = {name: client.submit(request(fmt, n)) for n, (name, fmt) in enumerate(FORMATS.items())}
    free = [client.submit(request(None, n)) for n in range(3)]
    for name, job_id in ids.items():
        assert client.wait(job_id, timeout=120).state.value == "succeeded", name
        result = client.result(job_id)
        assert result is not None
        if name == "json_object" and not result.output_complete:  # an open object may run to the cap
            assert result.finish_reason == "length" and result.output_json is None
            continue
        assert result.output_complete is True, (name, result)
        check_output(FORMATS[name], result.output_text)
        if FORMATS[name]["type"] in ("json_schema", "json_object"):
            assert result.output_json == json.loads(result.output_text)
        else:
            assert result.output_json is None
    for job_id in free:
        assert client.wait(job_id, timeout=120).state.value == "succeeded"
        result = client.result(job_id)
        assert result is not None and result.output_complete is None and result.output_json is None


def test_a_job_cut_at_max_new_tokens_says_it_is_incomplete(service):
    client: JobClient = service["client"]
    job_id = client.submit(request(FORMATS["nested objects"], max_new_tokens=4))
    assert client.wait(job_id, timeout=60).state.value == "succeeded"
    result = client.result(job_id)
    assert result is not None
    assert result.finish_reason == "length" and result.output_complete is False and result.output_json is None


def test_the_http_api_and_http_client_carry_the_format_and_the_json(service):
    with HttpJobClient(service["base"], KEY) as http:
        job_id = http.submit(request({"type": "json_schema", "json_schema": {"name": "product", "schema": PRODUCT}}))
        assert http.wait(job_id, timeout=120).state.value == "succeeded"
        result = http.result(job_id)
        assert result is not None and result.output_complete
        check_output(FORMATS["product (enum, number, array)"], result.output_text)
    spec = httpx.get(f"{service['base']}/openapi.json").json()
    job_request = spec["components"]["schemas"]["JobRequest"]
    assert "response_format" in job_request["properties"]
    assert spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobRequest"}
    assert {"JsonSchemaFormat", "RegexFormat", "ChoiceFormat"} <= set(spec["components"]["schemas"])


def test_every_refusal_code_through_both_clients_and_the_http_api_enqueues_nothing(service):
    client: JobClient = service["client"]
    redis = client.redis
    before_jobs = len(list(redis.scan_iter(keys.job_pattern())))
    before_queue = redis.llen(keys.INFER_QUEUE)
    seen = set()
    with HttpJobClient(service["base"], KEY) as http, httpx.Client(base_url=service["base"], timeout=30) as raw:
        for name, (fmt, code) in C.format_cases().items():
            body = request(fmt)
            for submit in (client.submit, http.submit):
                with pytest.raises(RequestRejected) as info:
                    submit(body)
                assert info.value.code.value == code, (name, submit, info.value)
            response = raw.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert response.status_code == 422 and response.json()["error"]["code"] == code, (name, response.text)
            seen.add(code)
    assert seen == {"invalid_schema", "unsupported_schema_feature", "invalid_regex", "empty_choices",
                    "schema_too_large"}
    assert len(list(redis.scan_iter(keys.job_pattern()))) == before_jobs
    assert redis.llen(keys.INFER_QUEUE) == before_queue


def test_a_compile_that_runs_past_its_timeout_is_refused_as_too_large():
    from pydantic import TypeAdapter

    from api_client.formats import FormatRejected, ResponseFormat, compile_format

    # Values no other test uses: a grammar validated before is cached and would answer at once.
    fresh = uuid.uuid4().hex[:8]
    schema = {"enum": [f"{fresh}{i}" for i in range(3000)]}
    spec = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    fmt = TypeAdapter(ResponseFormat).validate_python(spec)
    with pytest.raises(FormatRejected) as info:
        compile_format(fmt, timeout_s=1e-6)
    assert info.value.code == "schema_too_large"


def test_the_cli_submits_a_schema_file_a_choice_and_a_regex(service, tmp_path):
    schema_file = tmp_path / "product.json"
    schema_file.write_text(json.dumps(PRODUCT))
    base = [*CLI, "submit", "--redis-url", service["redis_url"], "--prompt", "Describe.", "--json"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # this tree's code

    def run(*extra: str) -> tuple[int, dict]:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120, env=env)
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])

    code, out = run("--json-schema", str(schema_file), "--wait")
    assert code == 0 and out["state"] == "succeeded", out
    result = service["client"].result(out["job_id"])
    assert result is not None and result.output_complete
    check_output(FORMATS["product (enum, number, array)"], result.output_text)
    code, out = run("--choice", "yes,no,not sure", "--wait")
    assert code == 0 and service["client"].result(out["job_id"]).output_text in ("yes", "no", "not sure")
    code, out = run("--regex", "a(b")
    assert code == 2 and out["error"]["code"] == "invalid_regex"
