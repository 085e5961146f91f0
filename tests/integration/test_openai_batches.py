"""OpenAI's Files and Batches through the official SDK, on the service's one batch engine: a full
cycle with good and refused lines (output and error files by custom_id), validation failures by
line, cancel keeping partial results, cursor pages, files' verbs, and other tenants' 404s. Real
uvicorn, redis-server, moto S3 and an in-process worker (tiny model)."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
import redis

from tests.faults.netfaults import WebhookReceiver
from tests.integration.openai_service import WEBHOOK_SECRET, openai_service

ENDPOINT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def svc(redis_url, s3_server, tmp_path_factory):
    with openai_service(redis_url, s3_server, tmp_path_factory.mktemp("openai-batches")) as service:
        yield service


def _line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": "tiny", "messages": [{"role": "user", "content": f"item {custom_id}"}],
                     "max_tokens": 3, "seed": 1, **body}}


def _upload(client: openai.OpenAI, lines: list) -> str:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return client.files.create(file=("in.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def _until_final(client: openai.OpenAI, batch_id: str, timeout: float = 120):
    end = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < end, batch
        time.sleep(0.3)
    return batch


def _jsonl(client: openai.OpenAI, file_id: str) -> dict[str, dict]:
    rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]
    return {row["custom_id"]: row for row in rows}


def test_a_full_batch_cycle_with_good_and_refused_lines(svc):
    client = svc.client()
    lines = [_line(f"ok-{i}") for i in range(4)] + [_line("hot", temperature=9), _line("many", n=2)]
    file_id = _upload(client, lines)
    receiver = WebhookReceiver(WEBHOOK_SECRET)
    batch = client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h",
                                  metadata={"run": "nightly"}, extra_body={"callback_url": receiver.url})
    assert (batch.object, batch.endpoint, batch.input_file_id, batch.completion_window) == (
        "batch", ENDPOINT, file_id, "24h")
    assert batch.status in ("in_progress", "finalizing", "completed") and batch.metadata == {"run": "nightly"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    done = _until_final(client, batch.id)
    assert done.status == "completed" and done.errors is None
    assert done.request_counts.model_dump() == {"total": 6, "completed": 4, "failed": 2}
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    out, err = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
    assert sorted(out) == [f"ok-{i}" for i in range(4)] and sorted(err) == ["hot", "many"]
    for row in out.values():
        assert row["error"] is None and row["response"]["status_code"] == 200 and row["id"].startswith("batch_req_")
        body = row["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] <= 3
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert {name: (row["response"]["status_code"], row["response"]["body"]["error"]["param"])
            for name, row in err.items()} == {"hot": (400, "temperature"), "many": (400, "n")}
    single = client.chat.completions.create(**lines[0]["body"])  # the same request, interactive: the same text
    assert out["ok-0"]["response"]["body"]["choices"][0]["message"]["content"] == single.choices[0].message.content
    assert done.usage.input_tokens == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in out.values())
    output_file = client.files.retrieve(done.output_file_id)
    assert (output_file.purpose, output_file.object) == ("batch_output", "file")
    end = time.monotonic() + 20
    while not receiver.snapshot() and time.monotonic() < end:
        time.sleep(0.1)
    receiver.close()
    [posted] = receiver.snapshot()  # the native batch's one completion callback, signed
    assert posted.event_type == "batch.completed" and posted.verified


@pytest.mark.parametrize("bad, line", [
    ("{not json", 2),
    (json.dumps({"custom_id": "x", "body": {}}), 2),  # no method, no url
    (json.dumps({**_line("x"), "url": "/v1/embeddings"}), 2),
    (json.dumps(_line("a")), 2),  # repeats custom_id "a"
])
def test_a_bad_envelope_fails_the_whole_batch_by_line(svc, bad, line):
    client = svc.client()
    batch = client.batches.create(input_file_id=_upload(client, [_line("a"), bad, _line("b")]), endpoint=ENDPOINT,
                                  completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None and batch.output_file_id is None
    assert [e.line for e in batch.errors.data] == [line] and batch.errors.data[0].message


def test_a_batch_whose_every_body_is_refused_completes_with_an_error_file_only(svc):
    client = svc.client()
    batch = client.batches.create(input_file_id=_upload(client, [_line("a", top_p=3), _line("b", model="gpt-4o")]),
                                  endpoint=ENDPOINT, completion_window="24h")
    assert batch.status == "completed" and batch.request_counts.model_dump() == {"total": 2, "completed": 0,
                                                                                 "failed": 2}
    assert client.files.content(batch.output_file_id).text == ""
    errors = _jsonl(client, batch.error_file_id)
    assert {k: r["response"]["status_code"] for k, r in errors.items()} == {"a": 400, "b": 404}


def test_cancel_keeps_what_ended_and_a_second_cancel_is_a_final_conflict(svc):
    client = svc.client()
    lines = [_line("quick")] + [_line(f"long-{i}", max_tokens=4000, min_tokens=4000) for i in range(3)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint=ENDPOINT, completion_window="24h")
    end = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.monotonic() < end
        time.sleep(0.2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = _until_final(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at >= done.cancelling_at
    assert done.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert list(_jsonl(client, done.output_file_id)) == ["quick"]  # the partial result stays
    errors = _jsonl(client, done.error_file_id)
    assert sorted(errors) == [f"long-{i}" for i in range(3)]
    assert all(r["error"]["code"] == "batch_cancelled" and r["response"] is None for r in errors.values())
    with pytest.raises(openai.ConflictError) as info:
        svc.client(max_retries=2).batches.cancel(batch.id)
    assert info.value.response.headers["x-should-retry"] == "false"


def test_a_batch_past_its_window_expires_keeping_what_ended(svc):
    client = svc.client()
    lines = [_line("quick")] + [_line("long", max_tokens=4000, min_tokens=4000)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint=ENDPOINT, completion_window="24h")
    end = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.monotonic() < end
        time.sleep(0.2)
    r = redis.Redis.from_url(svc.settings.redis_url)
    r.hset(f"{{ivq:tenant:acme}}:oai:batch:{batch.id}", "expires_at", json.dumps(int(time.time()) - 1))  # 24 h on
    r.close()
    done = _until_final(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    assert list(_jsonl(client, done.output_file_id)) == ["quick"]
    assert _jsonl(client, done.error_file_id)["long"]["error"]["code"] == "batch_expired"


def test_list_pages_with_after_and_has_more(svc):
    client = svc.client("globex")
    made = [client.batches.create(input_file_id=_upload(client, ["{"]), endpoint=ENDPOINT,
                                  completion_window="24h").id for _ in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # the SDK's pager follows `after`
    files = client.files.list()
    assert {f.id for f in files} >= {b.input_file_id for b in first.data}


def test_files_verbs_and_other_tenants_get_404(svc):
    acme, globex = svc.client(), svc.client("globex")
    file_id = _upload(acme, [_line("one")])
    info = acme.files.retrieve(file_id)
    assert (info.purpose, info.filename, info.bytes, info.status) == ("batch", "in.jsonl", info.bytes, "processed")
    assert json.loads(acme.files.content(file_id).text)["custom_id"] == "one"
    batch = acme.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    for call in (lambda: globex.files.retrieve(file_id), lambda: globex.files.content(file_id),
                 lambda: globex.files.delete(file_id), lambda: globex.batches.retrieve(batch.id),
                 lambda: globex.batches.cancel(batch.id),
                 lambda: globex.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in {b.id for b in globex.batches.list()}
    _until_final(acme, batch.id)
    assert acme.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(file_id)
    with pytest.raises(openai.BadRequestError) as bad:
        acme.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    assert bad.value.body["param"] == "endpoint"


def test_the_tenants_batch_quota_answers_429_and_records_nothing(svc):
    """The native batch quota (max_batch_jobs, here 3) through OpenAI's routes: a file of more lines is
    refused with 429, Retry-After at most 120 s and the native code, and no batch is recorded; one
    within the quota then runs, so the refusal took nothing."""
    client = svc.client("oai-batchcap")
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id=_upload(client, [_line(f"q-{i}") for i in range(5)]), endpoint=ENDPOINT,
                              completion_window="24h")
    assert refused.value.body["code"] == "quota_exceeded"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 120
    assert list(client.batches.list()) == []
    batch = client.batches.create(input_file_id=_upload(client, [_line(f"q-{i}") for i in range(3)]),
                                  endpoint=ENDPOINT, completion_window="24h")
    done = _until_final(client, batch.id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 3, 0)
