"""Pytest fixtures for the tiny random-weight InternVL model, built once per session.

Registered from tests/conftest.py with `pytest_plugins`. The checkpoint is
built offline into a session temp dir and loaded back through the real
`from_pretrained` path; its output text is gibberish by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class TinyRuntime:
    loaded: Any  # model_runtime.loading.Loaded
    engine: Any  # model_runtime.engine.Engine

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def processor(self) -> Any:
        return self.loaded.processor


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from model_runtime.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model_dir, tmp_path_factory) -> TinyRuntime:
    from model_runtime.engine import Engine
    from model_runtime.loading import load_runtime

    loaded = load_runtime(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("model-cache"), device="cpu")
    return TinyRuntime(loaded=loaded, engine=Engine(loaded, max_batch_size=8))
