"""Wire types (api_client.schema) into the model runtime's own types.

The runtime imports neither api_client nor worker, so the worker translates:
a request's generation settings and messages here, its errors in
worker/jobs/errors.py. Importing this module does not import torch.
"""

from __future__ import annotations

from api_client.schema import GenerationParams, JobRequest
from model_runtime.types import Sampling


def sampling_of(params: GenerationParams) -> Sampling:
    """How the request asked to decode, as the runtime's frozen `Sampling`."""
    return Sampling(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        stop=tuple(params.stop),
        min_new_tokens=params.min_new_tokens,
    )


def chat_of(request: JobRequest) -> list[dict]:
    """The request's messages as plain dicts in the HF chat format."""
    return [
        {"role": message.role, "content": [item.model_dump(exclude_none=True) for item in message.content]}
        for message in request.messages
    ]
