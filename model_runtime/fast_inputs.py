"""InternVL's processor for text and images, without its per-call bookkeeping.

`InternVLProcessor.__call__` spends most of a one-tile job's preprocessing
outside the pixels: it merges and type-checks its keyword arguments on every
call (huggingface_hub's strict dataclasses, ~25,000 attribute checks per call),
validates the inputs, and tokenizes the prompt with every `<IMG_CONTEXT>`
already expanded (256 per tile). For a 448 px JPEG that is ~3.5 ms of the
~6 ms `prepare` took, on the task thread or preprocessing process that runs it.

`FastInputs` does the same work by the processor's own parts:
- pixels: the image processor's `_preprocess_image_like_inputs` (the method its
  `preprocess` ends in: tiling, resize, rescale, normalize), with the keyword
  arguments resolved once from the processor's own settings;
- ids: the Rust tokenizer on the prompt with one placeholder per image, then
  each placeholder spliced into `<img>`, `<IMG_CONTEXT>` × 256 × tiles, `</img>`
  (they are added tokens, so the tokenizer splits the text around them either
  way).

It is only used where it gives the processor's exact output: `for_processor`
runs a probe request (two images, one tiled with a thumbnail) through both and
returns None on any difference, and for any processor class but InternVL's
with a tiling image processor. Requests with video always take the processor.
tests/integration/test_fast_inputs.py compares the two over many prompts and sizes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

log = logging.getLogger(__name__)

_CACHE: weakref.WeakKeyDictionary[Any, FastInputs | None] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class FastInputs:
    def __init__(self, processor: Any) -> None:
        ip = processor.image_processor
        self._image_processor = ip
        # What `preprocess` does to its defaults before each call, done once.
        defaults = {name: getattr(ip, name, None) for name in ip._valid_kwargs_names}
        self._image_kwargs = ip._standardize_kwargs(**defaults)
        self._encode = processor.tokenizer.backend_tokenizer.encode
        tokenizer = processor.tokenizer
        self._placeholder = int(tokenizer.convert_tokens_to_ids(processor.image_token))
        self._start = int(tokenizer.convert_tokens_to_ids(processor.start_image_token))
        self._end = int(tokenizer.convert_tokens_to_ids(processor.end_image_token))
        self._per_tile = int(processor.image_seq_length)

    def __call__(self, text: str, images: list[Any], max_tiles: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids, pixel_values) for one prompt: what `processor(text=, images=)` returns."""
        ids = self._encode(text).ids
        if not images:
            return torch.tensor(ids, dtype=torch.long), None
        kwargs = dict(self._image_kwargs, max_patches=max_tiles, return_tensors=None)
        out = self._image_processor._preprocess_image_like_inputs(images, **kwargs)
        tiles = out["num_patches"]
        pixel_values = torch.stack(list(out["pixel_values"]))
        spliced: list[int] = []
        image = 0
        for tok in ids:
            if tok != self._placeholder:
                spliced.append(tok)
                continue
            if image == len(images):
                raise ValueError(f"more image placeholders in the prompt than the {len(images)} images given")
            spliced.append(self._start)
            spliced.extend([self._placeholder] * (self._per_tile * int(tiles[image])))
            spliced.append(self._end)
            image += 1
        if image != len(images):
            raise ValueError(f"{image} image placeholders in the prompt for {len(images)} images")
        return torch.tensor(spliced, dtype=torch.long), pixel_values

    @staticmethod
    def for_processor(processor: Any) -> FastInputs | None:
        """The fast path for this processor, or None where it would not match the processor exactly."""
        with _LOCK:
            if processor in _CACHE:
                return _CACHE[processor]
            fast = _checked(processor)
            _CACHE[processor] = fast
            return fast


def _checked(processor: Any) -> FastInputs | None:
    ip = getattr(processor, "image_processor", None)
    if type(processor).__name__ != "InternVLProcessor" or not hasattr(ip, "_preprocess_image_like_inputs"):
        return None
    try:
        fast = FastInputs(processor)
        for text, images, max_tiles in _probes(processor):
            want = processor(text=text, images=images or None, return_tensors="pt", max_patches=max_tiles)
            ids, pixels = fast(text, images, max_tiles)
            if not torch.equal(ids, want["input_ids"][0]) or not _same(pixels, want.get("pixel_values")):
                log.warning("fast input path differs from the processor on a probe; using the processor")
                return None
    except Exception as exc:  # noqa: BLE001 - any failure of the probe (other internals, a template) keeps the processor
        log.warning("fast input path unavailable (%s: %s); using the processor", type(exc).__name__, exc)
        return None
    return fast


def _probes(processor: Any) -> list[tuple[str, list[Any], int]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))
    def text(content: list[dict]) -> str:
        chat = [{"role": "user", "content": content}]
        return processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    both = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Tag both.\n naïve 東京 "}]
    return [(text(both), [square, wide], 6), (text([{"type": "text", "text": "just text"}]), [], 12)]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
