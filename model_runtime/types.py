"""The typed things that flow through the model runtime.

One job is followed by following one type: decoded media and a chat become a
`Prepared` (on a task thread), the engine turns each `Prepared` into one
`Output` or raises one of the errors below for that request alone (on the
model thread). The runtime has its own types: it imports neither api_client
nor worker; the worker translates its wire types into these and back.
Importing this module does not import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from model_runtime.structured import Constraint

__all__ = [
    "RUNTIME_ERROR_CODES", "RequestError", "TooLargeForGPU", "RequestCancelled", "DeadlineExceeded",
    "GenerationFailed", "Sampling", "Prepared", "Output", "FinishReason",
]

FinishReason = Literal["stop", "length"]  # "stop": EOS or a stop string; "length": max_new_tokens reached

# Every `code` a runtime error carries; each is also a wire ErrorCode (a test checks).
RUNTIME_ERROR_CODES = frozenset({
    "invalid_request", "invalid_media", "media_too_large", "prompt_too_long", "too_large_for_gpu", "invalid_schema",
})


class RequestError(Exception):
    """A problem with one request (its media, its prompt, its size), never with the worker.

    It fails that job only; `code` is the stable wire code the client sees. The
    shape (code, message, retryable) is the service's `ServiceError`'s, which this
    package cannot import (it imports neither api_client nor worker).
    """

    retryable = False

    def __init__(self, code: str, message: str) -> None:
        if code not in RUNTIME_ERROR_CODES:
            raise ValueError(f"unknown runtime error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


class TooLargeForGPU(RequestError):
    """The request does not fit in memory even alone."""

    def __init__(self, message: str) -> None:
        super().__init__("too_large_for_gpu", message)


class RequestCancelled(Exception):
    """The request's `cancelled()` said so; it left the batch at a step boundary."""


class DeadlineExceeded(TimeoutError):
    """The request was still running (or waiting) at its deadline."""


class GenerationFailed(Exception):
    """The model raised while computing a step this request was part of (a worker fault)."""


@dataclass(frozen=True)
class Sampling:
    """How one request decodes; every request of a running batch has its own."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None  # sampled requests: same seed, same text, whatever the neighbours
    stop: tuple[str, ...] = ()  # output ends before the first of these strings
    min_new_tokens: int = 0  # EOS is not chosen before this many tokens (benchmarks pin lengths with it)


@dataclass
class Prepared:
    """One request, tokenized and with its pixels ready, waiting to be batched.

    `pixel_values` holds every image tile and every video frame of the request
    in prompt order (InternVL feeds video frames to the vision tower as tiles),
    or None for a text-only request. `cost` is in tokens: prompt tokens
    (image and video tokens included) plus the tokens it may generate, which
    is what its KV cache grows to. `deadline` (time.monotonic) and
    `cancelled` are set by the caller; the engine checks both at every step.
    `on_progress`, if set, is called on the model thread with the ids generated
    so far (a tuple of its own), at most every `progress_interval_s` and never
    once the request has ended; it must only hand them over (the continuous
    engine calls it; the static engine does not). If it raises, it is logged and
    not called again, and the request decodes on. `constraint`, if set
    (model_runtime/structured.py), is the grammar its output must match.
    `priority` orders admission in the continuous engine (interactive, then
    batch; then arrival); `tile_keys` are its tiles' content digests, set
    before it reaches the engine or by it (model_runtime/vision_cache.py).
    """

    request_id: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    sampling: Sampling
    prompt_tokens: int
    image_tiles: int
    video_frames: int
    cost: float
    preprocess_ms: float
    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    on_progress: Callable[[Sequence[int]], None] | None = None
    constraint: Constraint | None = None
    priority: int = 0  # the job's priority; below 0 (a batch file's job) is the batch class, admitted last
    tile_keys: tuple[bytes, ...] | None = None  # one content digest per row of pixel_values (vision_cache.py)

    @property
    def batch_class(self) -> bool:
        """A batch-lane job: interactive ones are admitted before it and may preempt it."""
        return self.priority < 0

    @property
    def tiles(self) -> int:
        """Rows of `pixel_values`: image tiles plus video frames."""
        return self.image_tiles + self.video_frames


@dataclass
class Output:
    """What one request got out of the engine."""

    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    generate_ms: float  # from admission (vision + prefill start) to the last token
    batch_size: int  # static: the batch; continuous: the largest running batch it was part of
    padding_tokens: int  # pad positions its prompt was given by neighbours (0 in the continuous engine)
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    wait_ms: float = 0.0  # continuous: from add() to admission
    grammar_complete: bool | None = None  # with a constraint: the output matches its grammar (None: no constraint)
