"""One job's request → its model inputs: fetch the media (under limits), decode them, run the processor.

`prepare_inputs` is the whole of it, and where it runs is the pool's choice
(worker/jobs/prep_pool.py): in a preprocessing process by default, so
decoding and the HF processor never hold the model process's GIL, or on the
task thread with IVQ_PREPROCESS_WORKERS=0. Errors rise as they are and are
classified by worker/jobs/errors.py, on whichever side they happened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from api_client.schema import ErrorCode, ImageItem, JobRequest, VideoItem
from worker.io.media_fetch import MediaFetcher
from worker.io.netguard import guarded_request
from worker.jobs.errors import JobFailed
from worker.jobs.translate import chat_of, sampling_of
from worker.settings import Settings

if TYPE_CHECKING:
    from model_runtime.media import MediaLimits
    from model_runtime.types import Prepared


@dataclass(frozen=True)
class InputEnv:
    """What turning a request into inputs needs; built once per process that does it."""

    settings: Settings
    media: MediaFetcher
    processor: Any
    media_limits: MediaLimits
    context_length: int | None


@dataclass
class StageCpu:
    """CPU seconds of this thread per stage of one job's preprocessing."""

    fetch: float = 0.0
    decode: float = 0.0
    processor: float = 0.0

    def as_ms(self) -> dict[str, float]:
        return {"fetch": self.fetch * 1000.0, "decode": self.decode * 1000.0, "processor": self.processor * 1000.0}


class InThreadInputs:
    """IVQ_PREPROCESS_WORKERS=0: prepare on the calling task thread, in the model process."""

    def __init__(self, env: InputEnv) -> None:
        self.env = env

    def prepare(self, job_id: str, request_json: str, request: JobRequest, *, deadline: float) -> Prepared:
        return prepare_inputs(self.env, job_id, request)


def prepare_inputs(env: InputEnv, job_id: str, request: JobRequest, cpu: StageCpu | None = None) -> Prepared:
    from model_runtime import media as media_rt
    from model_runtime import prompts  # module attributes, looked up per call (the bench wraps them)

    cpu = cpu if cpu is not None else StageCpu()
    decoded: dict[str, Any] = {}
    for item in request.media_items():
        t0 = time.thread_time()
        data = fetch_bytes(env, item)
        t1 = time.thread_time()
        limits = env.media_limits
        decoded[item.url] = (media_rt.decode_image(data, limits) if isinstance(item, ImageItem)
                             else media_rt.decode_video(data, limits, item.num_frames))
        cpu.fetch += t1 - t0
        cpu.decode += time.thread_time() - t1
    t2 = time.thread_time()
    prepared = prompts.prepare(
        env.processor, chat_of(request), decoded, sampling_of(request.generation), request_id=job_id,
        max_tiles=env.settings.max_tiles, context_length=env.context_length,
    )
    if env.settings.vision_cache_mb > 0:  # the vision cache's tile digests, here and not on the model's side
        from model_runtime.vision_cache import ensure_keys

        ensure_keys(prepared)
    cpu.processor += time.thread_time() - t2
    return prepared


def fetch_bytes(env: InputEnv, item: ImageItem | VideoItem) -> bytes:
    limits = env.media_limits
    max_bytes = limits.max_image_bytes if isinstance(item, ImageItem) else limits.max_video_bytes
    if item.url.startswith(("https://", "http://")):
        return _fetch_https(env.settings, item.url, max_bytes)
    return env.media.get_bytes(item.url, max_bytes=max_bytes)


def _fetch_https(settings: Settings, url: str, max_bytes: int) -> bytes:
    if not settings.allow_https_media:
        raise JobFailed("http(s) media is disabled on this service; use s3://", code=ErrorCode.forbidden_url)
    resp = guarded_request("GET", url, headers={}, body=None, timeout_s=30, max_response_bytes=max_bytes + 1,
                           allow_private=settings.callback_allow_private)
    if resp.status == 404:
        raise JobFailed(f"{resp.status} from media host", code=ErrorCode.media_not_found)
    if resp.status >= 500:
        raise JobFailed(f"{resp.status} from media host", code=ErrorCode.storage_unavailable, retryable=True)
    if resp.status != 200:
        raise JobFailed(f"{resp.status} from media host", code=ErrorCode.invalid_media)
    if len(resp.body) > max_bytes:
        raise JobFailed(f"media over {max_bytes} bytes", code=ErrorCode.media_too_large)
    return resp.body
