"""The model side of the service: load, decode media, build prompts, generate.

It knows nothing of Celery or Redis. Importing this package (or
`model_runtime.types` / `model_runtime.media`) does not import torch or
transformers; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Engine": "model_runtime.engine",
    "EngineStats": "model_runtime.engine",
    "Loaded": "model_runtime.loading",
    "load_runtime": "model_runtime.loading",
    "prepare": "model_runtime.prompts",
    "simple_chat": "model_runtime.prompts",
    "MediaLimits": "model_runtime.media",
    "VideoFrames": "model_runtime.media",
    "decode_image": "model_runtime.media",
    "decode_video": "model_runtime.media",
    "Sampling": "model_runtime.types",
    "Prepared": "model_runtime.types",
    "Output": "model_runtime.types",
    "RequestError": "model_runtime.types",
    "build_tiny": "model_runtime.tiny",
    "ensure_tiny": "model_runtime.tiny",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model_runtime' has no attribute {name!r}")
