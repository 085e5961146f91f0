"""A model wrapper that runs out of GPU memory above a size, on any machine.

`OomAbove(model, max_tokens)` behaves as `model`, except that a forward or
`generate` call whose input is larger than `max_tokens` (batch × sequence
length of `input_ids` or `inputs_embeds`) raises the real
`torch.cuda.OutOfMemoryError` before touching the model. The engines'
splitting and too_large_for_gpu paths then run without a GPU, and nothing
in production code knows about it.
"""

from __future__ import annotations

from typing import Any

import torch


class OomAbove:
    def __init__(self, model: Any, max_tokens: int) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.raised = 0  # calls refused with OutOfMemoryError

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check(args, kwargs)
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check(args, kwargs)
        return self.model.generate(*args, **kwargs)

    def _check(self, args: tuple, kwargs: dict) -> None:
        tensor = kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        if tensor is None and args and isinstance(args[0], torch.Tensor):
            tensor = args[0]  # input_ids passed positionally
        if tensor is None:
            return
        size = int(tensor.shape[0]) * int(tensor.shape[1]) if tensor.dim() >= 2 else int(tensor.shape[0])
        if size > self.max_tokens:
            self.raised += 1
            raise torch.cuda.OutOfMemoryError(f"OomAbove: input of {size} tokens > {self.max_tokens}")
