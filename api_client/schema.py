"""The wire contract between producers and workers (pydantic v2).

A request is the chat format of `processor.apply_chat_template`: a list of
messages whose content items are images, videos and text. Unknown fields are
rejected everywhere, and every limit that can be checked without the media
is checked here, at submit time.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api_client.formats import ResponseFormat

# Submit-time limits. The worker checks media-dependent limits again.
MAX_MESSAGES = 32
MAX_MEDIA_ITEMS = 16
MAX_TEXT_CHARS = 32_000
MAX_URL_CHARS = 2_048
MAX_METADATA_ITEMS = 32
MAX_REQUEST_BYTES = 256 * 1024
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
ALLOWED_URL_SCHEMES = ("s3://", "file://", "https://", "http://")


class ErrorCode(str, enum.Enum):
    """Stable error codes. Clients may branch on these; never rename one."""

    invalid_request = "invalid_request"
    media_not_found = "media_not_found"
    invalid_media = "invalid_media"
    media_too_large = "media_too_large"
    forbidden_url = "forbidden_url"
    prompt_too_long = "prompt_too_long"
    too_large_for_gpu = "too_large_for_gpu"
    timeout = "timeout"
    expired = "expired"
    cancelled = "cancelled"
    poison = "poison"
    storage_unavailable = "storage_unavailable"
    preprocess_crashed = "preprocess_crashed"
    internal_error = "internal_error"
    # A response_format that cannot be enforced (api_client/formats.py): refused at submit.
    invalid_schema = "invalid_schema"
    unsupported_schema_feature = "unsupported_schema_feature"
    invalid_regex = "invalid_regex"
    empty_choices = "empty_choices"
    schema_too_large = "schema_too_large"
    # Raised by the client or the HTTP API itself, never stored on a job.
    not_found = "not_found"
    broker_unavailable = "broker_unavailable"
    unauthorized = "unauthorized"
    rate_limited = "rate_limited"
    quota_exceeded = "quota_exceeded"
    conflict = "conflict"


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(url: str) -> str:
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"url longer than {MAX_URL_CHARS} characters")
    if not url.startswith(ALLOWED_URL_SCHEMES):
        raise ValueError(f"url scheme must be one of {', '.join(ALLOWED_URL_SCHEMES)}")
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://") :].partition("/")
        if not bucket or not key:
            raise ValueError("s3 url must be s3://bucket/key")
    if ".." in url.split("?", 1)[0].split("/"):
        raise ValueError("url must not contain '..' path segments")
    return url


class TextItem(_Strict):
    type: Literal["text"] = "text"
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImageItem(_Strict):
    type: Literal["image"] = "image"
    url: str

    _url = field_validator("url")(classmethod(lambda cls, v: _check_url(v)))


class VideoItem(_Strict):
    type: Literal["video"] = "video"
    url: str
    num_frames: int | None = Field(default=None, ge=1, le=64)

    _url = field_validator("url")(classmethod(lambda cls, v: _check_url(v)))


ContentItem = Annotated[TextItem | ImageItem | VideoItem, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: list[ContentItem] = Field(min_length=1)

    @field_validator("content", mode="before")
    @classmethod
    def _text_shorthand(cls, v: Any) -> Any:
        # {"role": "user", "content": "hi"} is accepted as one text item.
        return [{"type": "text", "text": v}] if isinstance(v, str) else v


class GenerationParams(_Strict):
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    min_new_tokens: int = Field(default=0, ge=0, le=4096, description="no end-of-sequence before this many tokens")
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=5.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS,
        description="the output ends before the first of these strings",
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in v):
            raise ValueError(f"each stop string must be 1..{MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _min_within_max(self) -> GenerationParams:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return self


CallbackEvent = Literal["running", "succeeded", "failed", "cancelled"]
TERMINAL_CALLBACK_EVENTS: list[CallbackEvent] = ["succeeded", "failed", "cancelled"]


class CallbackSpec(_Strict):
    url: str = Field(max_length=MAX_URL_CHARS)
    events: list[CallbackEvent] = Field(default_factory=lambda: list(TERMINAL_CALLBACK_EVENTS))
    secret_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @field_validator("url")
    @classmethod
    def _http_only(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("callback url must be http(s)")
        return v


class JobRequest(_Strict):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    callback: CallbackSpec | None = None
    idempotency_key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    priority: int = Field(default=0, ge=0, le=9, description="0 normal .. 9 most urgent")
    deadline: datetime | None = Field(default=None, description="end as expired if not started by then")
    metadata: dict[str, str] = Field(default_factory=dict)
    response_format: ResponseFormat | None = Field(
        default=None, description="the output's shape: text (default), json_object, json_schema, regex or choice")

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_METADATA_ITEMS or any(len(k) > 64 or len(x) > 1024 for k, x in v.items()):
            raise ValueError(f"metadata: at most {MAX_METADATA_ITEMS} items, keys <= 64, values <= 1024 chars")
        return v

    @model_validator(mode="after")
    def _limits(self) -> JobRequest:
        media = self.media_items()
        if len(media) > MAX_MEDIA_ITEMS:
            raise ValueError(f"at most {MAX_MEDIA_ITEMS} images/videos per request, got {len(media)}")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("at least one user message is required")
        return self

    def media_items(self) -> list[ImageItem | VideoItem]:
        return [c for m in self.messages for c in m.content if not isinstance(c, TextItem)]

    @classmethod
    def simple(cls, prompt: str, images: Sequence[str] = (), videos: Sequence[str] = (), **kw: Any) -> JobRequest:
        """One user turn: media first, then the prompt."""
        content: list[dict[str, str]] = [{"type": "image", "url": u} for u in images]
        content += [{"type": "video", "url": u} for u in videos]
        content.append({"type": "text", "text": prompt})
        return cls.model_validate({"messages": [{"role": "user", "content": content}], **kw})


class JobError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str
    retryable: bool = False


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tiles: int = 0
    video_frames: int = 0


class Timings(BaseModel):
    """Milliseconds spent in each stage of one job."""

    queued_ms: float = 0.0
    preprocess_ms: float = 0.0
    batch_wait_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0


class JobResult(BaseModel):
    """The full result, stored as JSON at {prefix}/results/{job_id}.json."""

    job_id: str
    output_text: str
    finish_reason: Literal["stop", "length"]
    # With a response_format: output_json is the parsed output when the format is JSON and the output
    # is complete; output_complete says whether the output matches the format (False: cut at
    # max_new_tokens, finish_reason "length", never to be taken as valid).
    output_json: Any | None = None
    output_complete: bool | None = None
    usage: Usage
    timings: Timings
    batch_size: int
    batch_id: str
    model: str
    worker_id: str
    attempt: int
    metadata: dict[str, str] = Field(default_factory=dict)


class Progress(BaseModel):
    """A running job's output so far (updated at most every 250 ms while it decodes)."""

    completion_tokens: int
    text: str


class JobStatus(BaseModel):
    """What the Redis record says about a job now."""

    job_id: str
    state: JobState
    attempts: int = 0
    created_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    error: JobError | None = None
    output_preview: str | None = None
    batch_size: int | None = None
    result_url: str | None = None
    progress: Progress | None = None

    @classmethod
    def from_record(cls, rec: dict[str, str]) -> JobStatus:
        """From the job record's hash (api_client/jobstate.py writes it)."""

        def num(name: str) -> float | None:
            v = rec.get(name)
            return float(v) if v not in (None, "") else None

        error = None
        if rec.get("error_code"):
            error = JobError(code=ErrorCode(rec["error_code"]), message=rec.get("error_message", ""))
        return cls(
            job_id=rec["job_id"], state=JobState(rec["state"]), attempts=int(rec.get("attempts", 0)),
            created_at=num("created_at"), queued_at=num("queued_at"), started_at=num("started_at"),
            finished_at=num("finished_at"), worker_id=rec.get("worker_id") or None, error=error,
            output_preview=rec.get("output_preview") or None,
            batch_size=int(rec["batch_size"]) if rec.get("batch_size") else None,
            result_url=rec.get("result_url") or None,
            progress=Progress(completion_tokens=int(rec["progress_tokens"]), text=rec.get("progress_text", ""))
            if rec.get("progress_tokens") and rec["state"] == "running" else None,
        )
