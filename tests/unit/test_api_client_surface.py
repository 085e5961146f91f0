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
    "ApiError", "BrokerUnavailable", "CallbackSpec", "ErrorCode", "GenerationParams", "ImageItem", "JobClient",
    "JobError", "JobNotFound", "JobRequest", "JobResult", "JobState", "JobStatus", "Message", "RequestRejected",
    "TextItem", "VideoItem", "WaitTimeout",
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


def test_text_shorthand_and_simple_builder_agree():
    a = JobRequest.model_validate({"messages": [{"role": "user", "content": "hello"}]})
    b = JobRequest.simple("hello")
    assert a == b


def test_generation_params_group_key_separates_decoding_modes():
    from api_client.schema import GenerationParams

    assert GenerationParams().group_key() == GenerationParams(max_new_tokens=64).group_key()
    assert GenerationParams().group_key() != GenerationParams(do_sample=True).group_key()


def test_broker_down_raises_quickly_instead_of_hanging():
    import time

    from api_client.errors import BrokerUnavailable
    from worker.embedded import free_port

    client = JobClient(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.submit(JobRequest.simple("hi"))
    with pytest.raises(BrokerUnavailable):
        client.status("x")
    assert time.monotonic() - t0 < 20
