"""The official `openai` SDK against the service, unchanged: chat completions (text, images from
https, data: and s3:// URLs, video, n, seed, stop, both token limits, structured output, streaming,
parse), models, each error class, one retry after a 429, and the tenant's limits and cancel on
disconnect through these routes. The tiny model's text is gibberish: the assertions are about
structure, counts and equalities."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from typing import Literal

import httpx
import openai
import pytest
import redis
from pydantic import BaseModel

from api_client import keys
from model_runtime.samples import make_sample_image, make_sample_video
from tests.integration.openai_service import KEYS, MEDIA_BUCKET, STORE_BUCKET, openai_service
from worker.http.app import create_api
from worker.http.tenants import TenantRegistry
from worker.ops.embedded import free_port, serve_in_thread

HELLO = [{"role": "user", "content": "hello"}]
LONG = {"max_tokens": 4000, "extra_body": {"min_tokens": 4000}}  # runs until cancelled (vLLM's min_tokens)


@pytest.fixture(scope="module")
def svc(redis_url, s3_server, tmp_path_factory):
    with openai_service(redis_url, s3_server, tmp_path_factory.mktemp("openai-chat")) as service:
        yield service


def _jobs_of(redis_url: str, tenant: str) -> dict[str, str]:
    """job id -> state, for every job of `tenant` in Redis."""
    r = redis.Redis.from_url(redis_url)
    try:
        found = {}
        for key in r.scan_iter(keys.job_pattern()):
            name, state, job_id = r.hmget(key, "tenant", "state", "job_id")
            if name == tenant.encode() and job_id:
                found[job_id.decode()] = state.decode()
        return found
    finally:
        r.close()


def _until(check, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_a_text_completion_has_the_full_shape_and_exact_usage(svc):
    client = svc.client()
    for limit in ({"max_completion_tokens": 5}, {"max_tokens": 3}):
        done = client.chat.completions.create(model="tiny", messages=HELLO, seed=1, **limit)
        cap = next(iter(limit.values()))
        assert done.id.startswith("chatcmpl-") and done.object == "chat.completion" and done.model == "tiny"
        assert isinstance(done.created, int) and abs(done.created - time.time()) < 120
        [choice] = done.choices
        assert (choice.index, choice.message.role) == (0, "assistant") and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        usage = done.usage
        assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= cap
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert (choice.finish_reason == "length") == (usage.completion_tokens == cap)
    [model] = client.models.list().data
    assert (model.id, model.object, client.models.retrieve("tiny").id) == ("tiny", "model", "tiny")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_n_choices_are_seeded_seed_plus_i_and_repeatable(svc):
    client = svc.client()
    three = client.chat.completions.create(model="tiny", messages=HELLO, n=3, seed=7, max_tokens=8)
    assert [c.index for c in three.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=HELLO, n=3, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]
    second = client.chat.completions.create(model="tiny", messages=HELLO, seed=8, max_tokens=8)
    assert second.choices[0].message.content == three.choices[1].message.content  # choice 1 ran with seed 8
    singles = [client.chat.completions.create(model="tiny", messages=HELLO, seed=7 + i, max_tokens=8)
               for i in range(3)]
    assert three.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens


def test_stream_equals_the_non_streamed_text_and_ends_with_usage(svc):
    client = svc.client()
    args = {"model": "tiny", "messages": HELLO, "seed": 11, "max_tokens": 24}
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(**args, stream=True))  # no usage chunk without include_usage
    assert all(c.choices for c in plain)
    two = client.chat.completions.create(**args, n=2)
    streamed = {0: "", 1: ""}
    for c in client.chat.completions.create(**args, n=2, stream=True):
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in two.choices]
    failing = client.chat.completions.create(model="tiny", max_tokens=2, stream=True, messages=[{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])
    with pytest.raises(openai.APIError) as info:  # the job failed after the stream began: an error event
        list(failing)
    assert "forbidden" in str(info.value.message).lower() or info.value.code == "forbidden_url"


def test_a_stop_string_cuts_the_output_before_it(svc):
    client = svc.client()
    done = client.chat.completions.create(model="tiny", messages=HELLO, seed=3, max_tokens=24)
    text = done.choices[0].message.content
    assert len(text) >= 8, text
    stop = text[5:7]
    cut = client.chat.completions.create(model="tiny", messages=HELLO, seed=3, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_images_from_https_data_and_s3_urls_and_a_video(svc):
    client = svc.client()
    jpeg = make_sample_image(96, 64, seed=1)
    png = make_sample_image(64, 64, seed=2, format="PNG")
    svc.media.files["/photo.jpg"] = jpeg
    svc.s3.put_object(Bucket=MEDIA_BUCKET, Key="p.jpg", Body=jpeg)
    svc.s3.put_object(Bucket=MEDIA_BUCKET, Key="clip.mp4", Body=make_sample_video(seconds=1, fps=4, width=64,
                                                                                  height=48))
    text_only = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.prompt_tokens
    urls = {"https": svc.media.url + "/photo.jpg", "s3": f"s3://{MEDIA_BUCKET}/p.jpg",
            "data": "data:image/png;base64," + base64.b64encode(png).decode()}
    for name, url in urls.items():
        done = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": "low"}}, {"type": "text", "text": "what?"}]}])
        assert done.usage.prompt_tokens > text_only, name  # the image's tokens are in the prompt
    stored = svc.s3.list_objects_v2(Bucket=STORE_BUCKET, Prefix="ivq/uploads/acme/")["Contents"]
    assert len(stored) == 1 and stored[0]["Key"].endswith(".png")  # the data: URL, stored under the tenant
    video = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"s3://{MEDIA_BUCKET}/clip.mp4"}}, {"type": "text", "text": "?"}]}])
    assert video.usage.prompt_tokens > text_only


class Verdict(BaseModel):
    label: Literal["yes", "no", "unsure"]
    damaged: bool


def test_json_object_strict_schema_and_parse(svc):
    client = svc.client()
    obj = client.chat.completions.create(model="tiny", messages=HELLO, seed=2, max_tokens=300,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"enum": ["one", "two"]}}}
    strict = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}})
    assert json.loads(strict.choices[0].message.content)["n"] in ("one", "two")
    parsed = client.chat.completions.parse(model="tiny", messages=HELLO, max_tokens=60, response_format=Verdict)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="tiny", messages=HELLO, max_tokens=2, response_format=Verdict)


def test_each_error_class_in_openais_shape(svc):
    client = svc.client()
    cases = [
        (openai.AuthenticationError, 401, "unauthorized", svc.client(api_key="ivq_wrong"), {}),
        (openai.BadRequestError, 400, "invalid_request", client,
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x.example/a.jpg"}]}]}),
        (openai.BadRequestError, 400, "invalid_request", client, {"temperature": 9}),
        (openai.NotFoundError, 404, "model_not_found", client, {"model": "gpt-4o"}),
        (openai.PermissionDeniedError, 403, "forbidden_url", client, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
        (openai.UnprocessableEntityError, 422, "unsupported_schema_feature", client, {"response_format": {
            "type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}}}),
    ]
    for kind, status, code, caller, override in cases:
        with pytest.raises(kind) as info:
            caller.chat.completions.create(**{"model": "tiny", "messages": HELLO, "max_tokens": 2, **override})
        assert info.value.status_code == status and info.value.code == code, (code, info.value.body)
        assert set(info.value.body) == {"message", "type", "param", "code"} and info.value.request_id
    # 5xx: the API with no Redis behind it
    dead = f"redis://127.0.0.1:{free_port()}/0"
    registry = TenantRegistry.for_keys({"acme": KEYS["acme"]})
    with serve_in_thread(create_api(dead, registry)) as base:
        with pytest.raises(openai.InternalServerError) as info:
            openai.OpenAI(base_url=base + "/v1", api_key=KEYS["acme"], max_retries=0).chat.completions.create(
                model="tiny", messages=HELLO)
    assert (info.value.status_code, info.value.code) == (503, "broker_unavailable")


def test_quota_gives_429_and_the_sdks_own_retry_gets_through_a_rate_limit(svc):
    tight = svc.client("oai-tight")
    def hold() -> None:  # a long job holding the one place until its client gives up (and it is cancelled)
        with pytest.raises(openai.APITimeoutError):
            tight.with_options(timeout=3).chat.completions.create(model="tiny", messages=HELLO, **LONG)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    _until(lambda: "running" in _jobs_of(svc.settings.redis_url, "oai-tight").values() or
           "queued" in _jobs_of(svc.settings.redis_url, "oai-tight").values())
    with pytest.raises(openai.RateLimitError) as info:
        tight.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert info.value.code == "quota_exceeded" and 1 <= int(info.value.response.headers["retry-after"]) <= 120
    holder.join(10)
    _until(lambda: list(_jobs_of(svc.settings.redis_url, "oai-tight").values()) == ["cancelled"])
    slow = svc.client("oai-slow", max_retries=2)
    slow.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)  # the burst of 1
    started = time.monotonic()
    done = slow.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)  # 429, Retry-After, retried
    assert done.choices[0].message.content is not None and time.monotonic() - started >= 1.0
    metrics = httpx.get(svc.base + "/metrics").text
    assert 'ivq_api_refusals_total{kind="job",reason="rate_limited",tenant="oai-slow"} 1.0' in metrics
    assert sorted(_jobs_of(svc.settings.redis_url, "oai-slow").values()) == ["succeeded"] * 2  # the refusal made none


def test_a_client_that_goes_away_cancels_its_jobs(svc):
    quitter = svc.client("oai-quitter", timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        quitter.chat.completions.create(model="tiny", messages=HELLO, n=2, **LONG)
    _until(lambda: sorted(_jobs_of(svc.settings.redis_url, "oai-quitter").values()) == ["cancelled", "cancelled"])
    stream = svc.client("oai-quitter").chat.completions.create(model="tiny", messages=HELLO, stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    _until(lambda: list(_jobs_of(svc.settings.redis_url, "oai-quitter").values()).count("cancelled") == 3)


def test_the_tenants_stream_cap_holds_on_chat_streams(svc):
    client = svc.client("oai-onestream")
    first = client.chat.completions.create(model="tiny", messages=HELLO, stream=True, **LONG)
    next(iter(first))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, stream=True)
    assert info.value.code == "quota_exceeded"
    first.close()
    _until(lambda: _try_stream(client))


def _try_stream(client: openai.OpenAI) -> bool:
    try:
        return bool(list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, stream=True)))
    except openai.RateLimitError:
        return False


def test_openapi_lists_the_openai_routes(svc):
    paths = httpx.get(svc.base + "/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/v1/files", "/v1/files/{file_id}",
                 "/v1/files/{file_id}/content", "/v1/batches", "/v1/batches/{batch_id}",
                 "/v1/batches/{batch_id}/cancel", "/v1/native/batches", "/v1/native/batches/{batch_id}/results"):
        assert path in paths, path


def test_the_readmes_curl_first_try_and_a_curl_stream(svc):
    """The README's first curl (an s3:// image and a question) as a user types it, then the same
    request streamed with `curl -N`: chunks, a usage chunk, [DONE], and the same text (greedy)."""
    svc.s3.put_object(Bucket=MEDIA_BUCKET, Key="curl.jpg", Body=make_sample_image(96, 64, seed=3))
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": f"s3://{MEDIA_BUCKET}/curl.jpg"}},
                                                       {"type": "text", "text": "Is the product damaged?"}]}]}

    def curl(*flags: str, payload: dict) -> str:
        done = subprocess.run(["curl", "-s", "--fail-with-body", *flags, f"{svc.base}/v1/chat/completions",
                               "-H", f"Authorization: Bearer {KEYS['acme']}", "-H", "Content-Type: application/json",
                               "-d", json.dumps(payload)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    reply = json.loads(curl(payload=body))
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] >= 1
    events = [line[len("data: "):] for line in curl("-N", payload={**body, "stream": True,
                                                                     "stream_options": {"include_usage": True}})
              .splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"] == reply["usage"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == reply["choices"][0]["message"]["content"]
