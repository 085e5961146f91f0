"""The producer's contract: the public names, the import weight, the schema's refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

import api_client
from api_client import JobRequest
from api_client.client import JobClient
from api_client.errors import RequestRejected

PUBLIC = {
    "BrokerUnavailable", "CallbackSpec", "ErrorCode", "GenerationParams", "HttpJobClient", "ImageItem", "JobClient",
    "JobError", "JobNotFound", "JobRequest", "JobResult", "JobState", "JobStatus", "Message", "RequestRejected",
    "ServiceError", "TextItem", "VideoItem", "WaitTimeout",
    # response_format (api_client/formats.py)
    "ResponseFormat", "TextFormat", "JsonObjectFormat", "JsonSchemaFormat", "JsonSchemaSpec", "RegexFormat",
    "ChoiceFormat",
}


def test_public_names_are_pinned():
    assert set(api_client.__all__) == PUBLIC
    assert all(hasattr(api_client, name) for name in PUBLIC)


def test_importing_the_client_pulls_in_no_model_stack():
    code = ("import sys, api_client, api_client.webhooks; "
            "print(sorted(m for m in ('torch', 'transformers', 'torchvision', 'av', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", [
    {"messages": [{"role": "user", "content": "hi"}], "surprise": True},                      # unknown field
    {"messages": [{"role": "user", "content": [{"type": "image", "url": "ftp://h/x.jpg"}]}]},  # scheme
    {"messages": [{"role": "user", "content": [{"type": "image", "url": "s3://bucket"}]}]},    # no key
    {"messages": [{"role": "user", "content": [{"type": "image", "url": "s3://b/../etc"}]}]},  # traversal
    {"messages": [{"role": "user", "content": [{"type": "audio", "url": "s3://b/k"}]}]},       # unknown type
    {"messages": [{"role": "system", "content": "only a system turn"}]},                      # no user turn
    {"messages": [{"role": "user", "content": "hi"}], "generation": {"max_new_tokens": 0}},
    {"messages": [{"role": "user", "content": "hi"}], "generation": {"temperature": "hot"}},
    {"messages": [{"role": "user", "content": "hi"}], "priority": 42},
    {"messages": [{"role": "user", "content": "hi"}], "callback": {"url": "ftp://x"}},
    {"messages": [{"role": "user", "content": [{"type": "image", "url": f"s3://b/{i}.jpg"} for i in range(17)]}]},
])
def test_schema_refuses_malformed_requests(bad):
    with pytest.raises(ValidationError):
        JobRequest.model_validate(bad)
    with pytest.raises(RequestRejected) as info:
        JobClient._validate(bad)
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x"}},                       # no schema
    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},  # name pattern
    {"type": "regex"},                                                           # no pattern
    {"type": "choice", "choices": "yes,no"},                                     # not a list
    {"type": "grammar", "grammar": "start: x"},                                  # unknown type
    {"type": "json_object", "schema": {}},                                       # unknown field
])
def test_malformed_response_formats_are_invalid_requests(fmt):
    with pytest.raises(RequestRejected) as info:
        JobClient._validate({"messages": [{"role": "user", "content": "hi"}], "response_format": fmt})
    assert info.value.code == "invalid_request"


def test_text_shorthand_and_simple_builder_agree():
    a = JobRequest.model_validate({"messages": [{"role": "user", "content": "hello"}]})
    b = JobRequest.simple("hello")
    assert a == b


def test_generation_params_stop_strings_are_bounded():
    from api_client.schema import MAX_STOP_CHARS, MAX_STOP_STRINGS, GenerationParams

    assert GenerationParams().stop == []
    assert GenerationParams(stop=["\n\n", "x" * MAX_STOP_CHARS]).stop == ["\n\n", "x" * MAX_STOP_CHARS]
    assert len(GenerationParams(stop=["a"] * MAX_STOP_STRINGS).stop) == MAX_STOP_STRINGS
    for bad in (["a"] * (MAX_STOP_STRINGS + 1), [""], ["x" * (MAX_STOP_CHARS + 1)], "END", [3]):
        with pytest.raises(ValidationError):
            GenerationParams(stop=bad)
    request = JobRequest.simple("hi", generation={"stop": ["END"]})
    assert JobRequest.model_validate_json(request.model_dump_json()).generation.stop == ["END"]


def test_broker_down_raises_quickly_instead_of_hanging():
    import time

    from api_client.errors import BrokerUnavailable
    from worker.ops.embedded import free_port

    client = JobClient(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.submit(JobRequest.simple("hi"))
    with pytest.raises(BrokerUnavailable):
        client.status("x")
    assert time.monotonic() - t0 < 20


def test_the_readme_lists_every_error_code_and_no_other():
    import re
    from pathlib import Path

    from api_client import ErrorCode

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert len(listed) == len(set(listed))
    assert set(listed) == {code.value for code in ErrorCode}
