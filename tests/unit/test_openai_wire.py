"""The OpenAI chat request -> JobRequests mapping (worker/http/openai_wire.py), without a service."""

from __future__ import annotations

import base64

import pytest

from api_client import JobRequest
from worker.http.openai_wire import MAX_DATA_URL_BYTES, OpenAIError, to_jobs


def _jobs(**body):
    stored: list[tuple[bytes, str]] = []

    def sink(data: bytes, ext: str) -> str:
        stored.append((data, ext))
        return f"s3://store/uploads/t/{len(stored)}.{ext}"

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return [JobRequest.model_validate(j) for j in to_jobs(body, "m", sink)], stored


def test_sampling_follows_openai_and_choices_are_seeded_seed_plus_i():
    [greedy], _ = _jobs(temperature=0)
    assert not greedy.generation.do_sample
    jobs, _ = _jobs(n=3, seed=5, top_p=0.5, max_completion_tokens=9, max_tokens=99, stop="##")
    assert [j.generation.seed for j in jobs] == [5, 6, 7]
    assert all(j.generation.do_sample and j.generation.temperature == 1.0 and j.generation.top_p == 0.5
               and j.generation.max_new_tokens == 9 and j.generation.stop == ["##"] for j in jobs)
    [plain], _ = _jobs(max_tokens=7, user="u")  # user: accepted and ignored
    assert plain.generation.max_new_tokens == 7 and plain.generation.seed is None


def test_parts_become_media_items_and_data_urls_are_stored():
    png = b"\x89PNG fake"
    [job], stored = _jobs(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "image_url", "image_url": {"url": "s3://media/a.jpg", "detail": "high"}},
            {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
            {"type": "text", "text": "what?"}]}])
    assert stored == [(png, "png")]
    assert job.messages[0].role == "system"
    assert [(c.type, getattr(c, "url", None)) for c in job.messages[1].content] == [
        ("image", "s3://store/uploads/t/1.png"), ("image", "s3://media/a.jpg"),
        ("video", "https://example.com/v.mp4"), ("text", None)]


@pytest.mark.parametrize("body, param, status", [
    ({"model": "other"}, "model", 404),
    ({"temperature": 2.5}, "temperature", 400),
    ({"n": 9}, "n", 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"tools": [{"type": "function"}]}, "tools", 400),
    ({"logprobs": True}, "logprobs", 400),
    ({"presence_penalty": 0.5}, "presence_penalty", 400),
    ({"bogus": 1}, "bogus", 400),
    ({"response_format": {"type": "regex"}}, "response_format", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/a.jpg"}]}]},
     "messages[0].content[0].image_url", 400),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:text/plain;base64,aGk="}}]}]}, "messages[0].content[0].image_url.url", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@"}}]}]}, "messages[0].content[0].image_url.url", 400),
])
def test_refusals_name_their_parameter(body, param, status):
    with pytest.raises(OpenAIError) as info:
        _jobs(**body)
    assert (info.value.param, info.value.status) == (param, status)


def test_an_oversized_data_url_is_media_too_large_before_decoding():
    huge = "A" * (MAX_DATA_URL_BYTES // 3 * 4 + 400)
    with pytest.raises(OpenAIError) as info:
        _jobs(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + huge}}]}])
    assert info.value.openai_code == "media_too_large"
