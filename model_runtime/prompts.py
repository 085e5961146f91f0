"""A request (HF chat format) plus its decoded media → a `Prepared`, ready to batch.

This runs on the task threads, many at once, off the GPU's critical path.
It keeps no state of its own; the one shared object is the processor. Its
image and video processors compute everything from their arguments, and the
Rust tokenizer only changes its own settings when a call asks for different
padding/truncation than the last one, which never happens here: every call
uses the same arguments. tests/integration/test_prompts.py runs `prepare`
from many threads at once and checks the results match a serial run.

User text may not contain the control tokens (chat role markers, image and
video placeholders): they would let a request speak as the system, or make
the placeholder count disagree with its media and fail its whole batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from model_runtime.fast_inputs import FastInputs
from model_runtime.media import VideoFrames
from model_runtime.types import Prepared, RequestError, Sampling


def simple_chat(text: str, images: Sequence[str] = (), videos: Sequence[str] = ()) -> list[dict]:
    """One user message: the images, then the videos, then the text."""
    content: list[dict] = [{"type": "image", "url": url} for url in images]
    content += [{"type": "video", "url": url} for url in videos]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def control_tokens(processor: Any) -> set[str]:
    """Tokens user text must not contain: named specials, media markers, template literals."""
    tokenizer = processor.tokenizer
    template = processor.chat_template if isinstance(processor.chat_template, str) else ""
    tokens = {
        tok
        for tok in (
            tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token,
            processor.image_token, processor.video_token,
            processor.start_image_token, processor.end_image_token,
        )
        if tok
    }
    # Grounding tokens such as <ref>/<box> stay usable: only those the template writes are reserved.
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.content in template)
    return tokens


def _content(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):  # the chat template's shorthand for one text item
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError("invalid_request", "message content must be a list of items")
    return content


def _messages(messages: list[dict], media: dict[str, Any], reserved: set[str]):
    rendered, images, videos = [], [], []
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError("invalid_request", f"unknown message role {role!r}")
        content: list[dict] = []
        for item in _content(message):
            kind = item.get("type")
            if kind == "text":
                text = item.get("text", "")
                hit = next((tok for tok in reserved if tok in text), None)
                if hit is not None:
                    raise RequestError("invalid_request", f"text must not contain the control token {hit!r}")
                content.append({"type": "text", "text": text})
                continue
            if kind not in ("image", "video"):
                raise RequestError("invalid_request", f"unknown content item type {kind!r}")
            url = item.get("url")
            if url not in media:
                raise RequestError("invalid_request", f"no decoded media for {url}")
            decoded = media[url]
            if kind == "image":
                if isinstance(decoded, VideoFrames):
                    raise RequestError("invalid_request", f"{url} is a video, used as an image")
                images.append(decoded)
            else:
                if not isinstance(decoded, VideoFrames):
                    raise RequestError("invalid_request", f"{url} is an image, used as a video")
                videos.append(decoded.frames)
            # The template writes only a placeholder; pixels go to the processor separately, in order.
            content.append({"type": kind})
        rendered.append({"role": role, "content": content})
    return rendered, images, videos


def default_context_length(processor: Any) -> int | None:
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**8 else None


def prepare(
    processor: Any,
    messages: list[dict],
    media: dict[str, Any],
    sampling: Sampling,
    *,
    request_id: str,
    max_tiles: int = 12,
    context_length: int | None = None,
) -> Prepared:
    """Render the chat, run the processor on this one request, and count what it costs.

    Text and images go through `FastInputs` (the processor's own steps without
    its per-call bookkeeping) wherever it gives the processor's exact output.

    `messages` is the HF chat format: `[{"role": ..., "content": [{"type": "text",
    "text": ...}, {"type": "image", "url": ...}, {"type": "video", "url": ...}]}]`
    (other keys of an item, such as `num_frames`, are ignored). `media` maps
    each url to a PIL image or `VideoFrames`. `context_length` is the model's (text_config.max_position_embeddings);
    without it the tokenizer's model_max_length is used.
    """
    started = time.perf_counter()
    rendered, images, videos = _messages(messages, media, control_tokens(processor))
    text = processor.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    fast = None if videos else FastInputs.for_processor(processor)
    try:
        if fast is not None:
            input_ids, pixel_values = fast(text, images, max_tiles)
        else:
            inputs = processor(
                text=text,
                images=images or None,
                videos=videos or None,
                return_tensors="pt",
                max_patches=max_tiles,
            )
            input_ids, pixel_values = inputs["input_ids"][0], inputs.get("pixel_values")
    except ValueError as exc:  # e.g. a frame size the processors cannot resize
        raise RequestError("invalid_media", f"the processor rejected the media: {exc}") from None

    video_frames = sum(int(v.shape[0]) for v in videos)
    rows = 0 if pixel_values is None else int(pixel_values.shape[0])
    prompt_tokens = int(input_ids.shape[0])
    max_new = sampling.max_new_tokens
    limit = context_length or default_context_length(processor)
    if limit is not None and prompt_tokens + max_new > limit:
        raise RequestError(
            "prompt_too_long",
            f"prompt is {prompt_tokens} tokens (images and video frames included) + max_new_tokens "
            f"{max_new} > context length {limit}; use fewer or smaller media, or fewer frames",
        )
    return Prepared(
        request_id=request_id,
        input_ids=input_ids,
        pixel_values=pixel_values,
        sampling=sampling,
        prompt_tokens=prompt_tokens,
        image_tiles=rows - video_frames,
        video_frames=video_frames,
        cost=float(prompt_tokens + max_new),
        preprocess_ms=(time.perf_counter() - started) * 1000.0,
    )
