"""The typed things that flow through the model runtime.

One job is followed by following one type: decoded media and the request
become a `Prepared` (on a task thread), a batch of `Prepared` becomes one
`Output` or `JobError` each (on the batch thread). Importing this module does
not import torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from api_client.schema import ErrorCode, GenerationParams, JobError

if TYPE_CHECKING:
    import torch

__all__ = ["RequestError", "Prepared", "Output", "ErrorCode", "JobError"]


class RequestError(Exception):
    """A problem with one request (its media, its prompt), never with the worker.

    It fails that job only; `code` is the stable wire code the client sees.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def to_job_error(self) -> JobError:
        return JobError(code=self.code, message=self.message, retryable=False)


@dataclass
class Prepared:
    """One request, tokenized and with its pixels ready, waiting to be batched.

    `pixel_values` holds every image tile and every video frame of the request
    in prompt order (InternVL feeds video frames to the vision tower as tiles),
    or None for a text-only request. `cost` is in tokens: prompt tokens
    (image and video tokens included) plus the tokens it may generate, which
    is what the KV cache of a batch grows with.
    """

    request_id: str
    input_ids: "torch.Tensor"
    pixel_values: "torch.Tensor | None"
    generation: GenerationParams
    prompt_tokens: int
    image_tiles: int
    video_frames: int
    cost: float
    preprocess_ms: float

    @property
    def tiles(self) -> int:
        """Rows of `pixel_values`: image tiles plus video frames."""
        return self.image_tiles + self.video_frames


@dataclass
class Output:
    """What one request got out of one batch."""

    request_id: str
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    generate_ms: float
    batch_size: int
    padding_tokens: int
