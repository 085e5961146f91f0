"""One error tree, classified by class (worker/jobs/errors.py), and one backoff."""

from __future__ import annotations

import concurrent.futures
import random

import pytest
import redis
from pydantic import BaseModel, ValidationError

from api_client import BrokerUnavailable, ErrorCode, JobNotFound, RequestRejected, ServiceError, WaitTimeout
from worker.jobs import callbacks
from worker.model.batcher import BatcherClosed
from worker.jobs.errors import Action, Draining, JobFailed, backoff_delay, classify
from worker.io.media_fetch import (
    ForbiddenMedia,
    InvalidMediaUrl,
    MediaNotFound,
    MediaTooLarge,
    StorageError,
    StorageUnavailable,
)
from worker.io.netguard import ForbiddenURL
from worker.jobs.prep_pool import PreprocessCrashed


@pytest.mark.parametrize(("exc", "action", "code"), [
    (MediaNotFound("s3://b/k: not found"), Action.FAIL, ErrorCode.media_not_found),
    (MediaTooLarge("big"), Action.FAIL, ErrorCode.media_too_large),
    (ForbiddenMedia("outside the root"), Action.FAIL, ErrorCode.forbidden_url),
    (InvalidMediaUrl("bad url"), Action.FAIL, ErrorCode.forbidden_url),  # inherits its parent's code
    (StorageUnavailable("503"), Action.RETRY, ErrorCode.storage_unavailable),
    (StorageError("no credentials"), Action.FAIL, ErrorCode.internal_error),
    (ForbiddenURL("private address"), Action.FAIL, ErrorCode.forbidden_url),
    (JobFailed("404 from media host", code=ErrorCode.media_not_found), Action.FAIL, ErrorCode.media_not_found),
    (JobFailed("502", code=ErrorCode.storage_unavailable, retryable=True), Action.RETRY,
     ErrorCode.storage_unavailable),
    (PreprocessCrashed("the preprocessing process died"), Action.FAIL, ErrorCode.preprocess_crashed),
    (BatcherClosed(), Action.REQUEUE, ErrorCode.internal_error),
    (Draining(), Action.REQUEUE, ErrorCode.internal_error),
    (concurrent.futures.TimeoutError(), Action.RETRY, ErrorCode.timeout),  # a future's wait ran out
    (redis.ConnectionError("reset"), Action.RETRY, ErrorCode.internal_error),
    (ValueError("a bug"), Action.FAIL, ErrorCode.internal_error),
])
def test_classify_maps_by_class(exc, action, code):
    c = classify(exc)
    assert (c.action, c.code) == (action, code)


def test_a_validation_error_is_the_requests_fault():
    class Strict(BaseModel):
        n: int

    with pytest.raises(ValidationError) as info:
        Strict.model_validate({"n": "x"})
    assert classify(info.value).code is ErrorCode.invalid_request


def test_a_class_with_a_known_name_is_not_mistaken_for_it():
    class MediaNotFound(Exception):  # named like the storage error on purpose
        pass

    assert classify(MediaNotFound("x")).code is ErrorCode.internal_error


def test_every_named_error_carries_code_message_and_retryable():
    for err in (RequestRejected("bad"), JobNotFound("j1"), WaitTimeout("slow"), BrokerUnavailable("down"),
                MediaNotFound("m"), ForbiddenURL("f"), JobFailed("x", code=ErrorCode.invalid_media)):
        assert isinstance(err, ServiceError) and isinstance(err.code, ErrorCode) and err.message
        assert isinstance(err.retryable, bool)
    assert (JobNotFound("j1").code, BrokerUnavailable("x").retryable) == (ErrorCode.not_found, True)


def test_one_backoff_serves_jobs_and_callbacks():
    assert callbacks.backoff_delay is backoff_delay
    ceilings = [backoff_delay(n, base_s=1.0, cap_s=10.0, rng=random.Random(0)) for n in range(8)]
    assert all(0 <= d <= min(10.0, 2.0 ** n) for n, d in enumerate(ceilings))
