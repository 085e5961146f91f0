"""How much a worker can hold: the warm-up request, KV bytes per token, the KV budget from free memory.

Like TGI, a worker proves its largest batch at start: warm-up runs
`max_batch_size` copies of a representative 12-tile image request, so a cap
the device cannot hold fails before the worker says it is ready. On CUDA the
continuous engine's KV budget (tokens) is then read off the memory still
free after warm-up; on a CPU it is a setting.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from model_runtime.types import Prepared, Sampling

log = structlog.get_logger(__name__)

WARMUP_URL = "file://warmup.jpg"
CPU_DEFAULT_BATCH_TOKENS = 131_072


def warmup_request(loaded: Any, *, max_new_tokens: int = 16, request_id: str = "warmup") -> Prepared:
    """A 4 × 3 tile image (12 tiles + the thumbnail at any tile size) and a short prompt."""
    from model_runtime.media import MediaLimits, decode_image
    from model_runtime.prompts import prepare, simple_chat
    from model_runtime.samples import make_sample_image

    tile = int(loaded.processor.image_processor.size["height"])
    image = decode_image(make_sample_image(4 * tile, 3 * tile, seed=7), MediaLimits())
    return prepare(
        loaded.processor, simple_chat("Describe this image in detail.", images=[WARMUP_URL]), {WARMUP_URL: image},
        Sampling(max_new_tokens=max_new_tokens), request_id=request_id, context_length=loaded.context_length,
    )


def kv_bytes_per_token(model: Any) -> int:
    """Keys + values of one token over every decoder layer."""
    import torch

    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element


def kv_budget_tokens(model: Any, *, device: str, setting: int | None, memory_fraction: float = 0.85) -> int:
    """The setting if given; else on CUDA a share of the free memory now, on a CPU the default."""
    if setting is not None:
        return setting
    if not device.startswith("cuda"):
        return CPU_DEFAULT_BATCH_TOKENS
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return max(1, int(free * memory_fraction) // kv_bytes_per_token(model))


def warm_up(engine: Any, size: int, *, max_new_tokens: int = 16) -> float:
    """`size` warm-up requests through a continuous engine at once; raise on any failure. Returns seconds."""
    items = [warmup_request(engine.loaded, max_new_tokens=max_new_tokens, request_id=f"warmup-{i}")
             for i in range(size)]
    started = time.perf_counter()
    failed = [r for r in engine.run_until_done(items) if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"warm-up at batch {size} failed: {failed[0]!r}") from failed[0]
    seconds = time.perf_counter() - started
    log.info("warmup_done", engine="continuous", batch_size=size, prompt_tokens=items[0].prompt_tokens,
             seconds=round(seconds, 3))
    return seconds
