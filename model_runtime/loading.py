"""Load the model and processor once per worker: device, dtype, attention, quantization.

Every "auto" choice is made here, logged with its reason, and can be
overridden. `model` is "tiny"/"small" (random-weight checkpoints built
offline into `cache_dir`), a hub id, or a local directory; all go through
the ordinary `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

TINY_MODELS = ("tiny", "small", "tile448")
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32"}


@dataclass
class Loaded:
    model: Any
    processor: Any
    model_id: str
    device: str
    dtype: str
    attn_implementation: str
    load_seconds: float
    quantization: str = "none"
    grammars: Any = None  # model_runtime.structured.Grammars: llguidance's tokenizer, built once here

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def choose_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[dtype]


def choose_attention(attn_implementation: str, device: str, dtype: str) -> tuple[str, str]:
    """Return (implementation, why)."""
    if attn_implementation != "auto":
        return attn_implementation, "requested"
    if not device.startswith("cuda"):
        return "sdpa", "no CUDA device"
    if dtype == "float32":
        return "sdpa", "flash attention needs fp16/bf16"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash_attn is not installed"
    return "flash_attention_2", "flash_attn is installed and CUDA is present"


def _quantization_config(quantization: str, device: str, dtype: str):
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"unknown quantization {quantization!r}; use none, 4bit or 8bit")
    if not device.startswith("cuda"):
        raise RuntimeError(f"{quantization} quantization needs a CUDA device, this worker runs on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{quantization} quantization needs the bitsandbytes package, which is not installed")
    import torch
    from transformers import BitsAndBytesConfig

    # The vision tower and projector are small and sensitive: keep them unquantized.
    skip = ["vision_tower", "multi_modal_projector", "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=getattr(torch, dtype),
        llm_int8_skip_modules=skip,
    )


def resolve_model_path(model: str, cache_dir: str | Path) -> str:
    if model in TINY_MODELS:
        from model_runtime.tiny import ensure_tiny

        return str(ensure_tiny(cache_dir, size=model))
    return model


def load_runtime(
    model: str,
    *,
    cache_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    quantization: str = "none",
) -> Loaded:
    import torch
    from transformers import AutoModelForImageTextToText

    started = time.perf_counter()
    device = choose_device(device)
    dtype = choose_dtype(dtype, device)
    attention, why = choose_attention(attn_implementation, device, dtype)
    quant_config = _quantization_config(quantization, device, dtype)
    path = resolve_model_path(model, cache_dir)
    hub_cache = None if Path(path).is_dir() else str(cache_dir)

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "cache_dir": hub_cache}
    if quant_config is not None:
        kwargs.update(quantization_config=quant_config, device_map={"": device})
    try:
        net = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attention, **kwargs)
    except (ValueError, ImportError) as exc:
        if attn_implementation != "auto" or attention == "eager":
            raise
        # This architecture (or this torch) cannot use the chosen kernel; eager always works.
        log.warning("attention_fallback", wanted=attention, using="eager", error=str(exc))
        attention, why = "eager", f"{attention} failed: {exc}"
        net = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attention, **kwargs)
    if quant_config is None:
        # PreTrainedModel.to is decorated with functools.wraps, which typeshed types as not binding `self`.
        net = net.to(device)  # type: ignore[arg-type]
    net.eval()

    processor = load_processor(path, cache_dir=hub_cache)
    from model_runtime.structured import build_grammars

    grammars = build_grammars(processor.tokenizer, net)

    seconds = time.perf_counter() - started
    log.info(
        "model_loaded", model=model, path=path, device=device, dtype=dtype, attn_implementation=attention,
        attention_reason=why, quantization=quantization, load_seconds=round(seconds, 3),
    )
    return Loaded(
        model=net, processor=processor, model_id=model, device=device, dtype=dtype,
        attn_implementation=attention, load_seconds=seconds, quantization=quantization, grammars=grammars,
    )


def load_processor(path: str, *, cache_dir: str | None = None) -> Any:
    """The checkpoint's processor as the engine expects it (also what a preprocessing process loads)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, cache_dir=cache_dir)
    # Batches are left-padded so every row's last prompt token is where generation starts.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    _prime_processor(processor)
    return processor


def _prime_processor(processor: Any) -> None:
    """Run one request with an image and a video through `prepare`, on this thread.

    transformers resolves some imports on first use and its lazy importer is
    not thread-safe; doing the first call here means the task threads that
    call `prepare` concurrently later never race on an import.
    """
    import numpy as np
    from PIL import Image

    from model_runtime.fast_inputs import FastInputs
    from model_runtime.media import VideoFrames
    from model_runtime.prompts import prepare, simple_chat
    from model_runtime.types import Sampling

    media = {
        "file://prime.png": Image.new("RGB", (64, 32), (127, 127, 127)),
        "file://prime.mp4": VideoFrames(np.zeros((2, 32, 32, 3), np.uint8), 1.0, 2.0, 2, [0.5, 1.5]),
    }
    chat = simple_chat("hi", images=["file://prime.png"], videos=["file://prime.mp4"])
    prepare(processor, chat, media, Sampling(), request_id="prime", max_tiles=2, context_length=None)
    FastInputs.for_processor(processor)  # its probe against the processor, once, at load
