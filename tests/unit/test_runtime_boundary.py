"""The model runtime stands alone: it imports neither api_client nor worker.

The worker translates between the two (worker/jobs/translate.py, worker/jobs/errors.py);
these tests pin both sides of that boundary.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from api_client.schema import ErrorCode, GenerationParams, JobRequest
from model_runtime.prompts import simple_chat
from model_runtime.types import (
    RUNTIME_ERROR_CODES, DeadlineExceeded, GenerationFailed, RequestCancelled, RequestError, Sampling, TooLargeForGPU,
)
from worker.jobs.errors import Action, classify
from worker.jobs.translate import chat_of, sampling_of

NAMED = {"types", "media", "samples", "prompts", "engine", "loading", "tiny"}


def test_no_runtime_module_imports_api_client_or_worker():
    # Every module of the package, the named ones and any added later, in a fresh interpreter.
    code = (
        "import json, pkgutil, importlib, sys, model_runtime; "
        "names = sorted(m.name for m in pkgutil.iter_modules(model_runtime.__path__)); "
        "[importlib.import_module('model_runtime.' + n) for n in names]; "
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('api_client', 'worker')); "
        "print(json.dumps({'names': names, 'leaked': leaked}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert NAMED <= set(found["names"])
    assert found["leaked"] == []


def test_every_runtime_error_code_is_a_wire_error_code():
    wire = {code.value for code in ErrorCode}
    assert RUNTIME_ERROR_CODES <= wire
    with pytest.raises(ValueError):
        RequestError("no_such_code", "x")


def test_sampling_of_copies_every_decoding_setting():
    params = GenerationParams(max_new_tokens=9, do_sample=True, temperature=0.5, top_p=0.9, top_k=40,
                              repetition_penalty=1.1, seed=3, stop=["END", "\n\n"])
    sampling = sampling_of(params)
    assert sampling == Sampling(max_new_tokens=9, do_sample=True, temperature=0.5, top_p=0.9, top_k=40,
                                repetition_penalty=1.1, seed=3, stop=("END", "\n\n"))
    assert hash(sampling) == hash(sampling_of(params))  # a batching group key
    assert sampling_of(GenerationParams()) == Sampling()  # both sides agree on the defaults
    # Every wire setting has a runtime field of the same name: a new one must be translated too.
    assert set(GenerationParams.model_fields) == set(Sampling.__dataclass_fields__)


def test_chat_of_gives_plain_chat_dicts():
    request = JobRequest.simple("What?", images=["s3://b/a.jpg"], videos=["s3://b/c.mp4"])
    assert chat_of(request) == simple_chat("What?", images=["s3://b/a.jpg"], videos=["s3://b/c.mp4"])
    turns = JobRequest(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video", "url": "s3://b/c.mp4", "num_frames": 4},
                                     {"type": "text", "text": "And?"}]},
    ])
    assert chat_of(turns) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "video", "url": "s3://b/c.mp4", "num_frames": 4},
                                     {"type": "text", "text": "And?"}]},
    ]
    json.dumps(chat_of(turns))  # plain data all the way down


@pytest.mark.parametrize("code", sorted(RUNTIME_ERROR_CODES))
def test_runtime_request_errors_fail_the_job_with_their_code(code):
    c = classify(RequestError(code, "bad"))
    assert (c.action, c.code, c.message) == (Action.FAIL, ErrorCode(code), "bad")


def test_runtime_errors_are_mapped_by_class():
    assert classify(TooLargeForGPU("alone")).code is ErrorCode.too_large_for_gpu
    failed = classify(GenerationFailed("boom"))
    assert (failed.action, failed.code) == (Action.FAIL, ErrorCode.internal_error)
    assert isinstance(DeadlineExceeded("late"), TimeoutError)
    late = classify(DeadlineExceeded("late"))
    assert (late.action, late.code) == (Action.RETRY, ErrorCode.timeout)
    assert classify(RequestCancelled("gone")).code is ErrorCode.cancelled

    class RequestError(Exception):  # same name, another class: not the runtime's
        code = "invalid_media"

    assert classify(RequestError("x")).code is ErrorCode.internal_error


def test_min_new_tokens_reaches_the_runtime_and_may_not_exceed_max():
    from pydantic import ValidationError

    assert sampling_of(GenerationParams(max_new_tokens=9, min_new_tokens=9)).min_new_tokens == 9
    with pytest.raises(ValidationError, match="min_new_tokens"):
        GenerationParams(max_new_tokens=4, min_new_tokens=5)
