"""Run a micro-batch of `Prepared` requests through one `model.generate` per group.

The static engine, kept for side-by-side benchmarks. Only the model thread
calls this. Requests batch together only when they decode the same way
(equal `Sampling`); each group is left-padded into one tensor, its pixel
rows concatenated in order, and generated once. Left padding with a proper
attention mask gives every row the same greedy tokens it would get alone
(tests/integration/test_engine.py checks it). Stop strings are applied to
the decoded text afterwards.

Each request gets an `Output` or an exception instance of its own.
Failures: CUDA out-of-memory splits the group in halves and retries each
half, down to single requests; a request that does not fit alone gets
`TooLargeForGPU` and its neighbours still run. Any other exception gives
every request of that group `GenerationFailed`; we do not bisect to find a
culprit, because requests reaching here were already validated by `prepare`
and a generate failure is a worker fault, not a request fault. A request
already cancelled or past its deadline when its batch starts does not run:
it gets `RequestCancelled` / `DeadlineExceeded`. It reports no progress while a
batch generates: it never calls `Prepared.on_progress` (only the continuous engine does).
Requests with a response_format (`Prepared.constraint`) batch apart from free ones and decode
through a logits processor that masks each row by its own grammar (model_runtime/structured.py).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from model_runtime.text import decode_text
from model_runtime.types import (
    DeadlineExceeded, FinishReason, GenerationFailed, Output, Prepared, RequestCancelled, Sampling, TooLargeForGPU,
)

log = structlog.get_logger(__name__)


@dataclass
class EngineStats:
    batches: int = 0  # generate calls
    items: int = 0
    padded_tokens: int = 0  # pad positions added by left padding
    total_tokens: int = 0  # rows × longest prompt, summed over generate calls
    generate_seconds: float = 0.0
    oom_splits: int = 0


class Engine:
    """Owns the model on the model thread."""

    def __init__(self, loaded: Any, *, max_batch_size: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.max_batch_size = max_batch_size
        self.stats = EngineStats()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    # ------------------------------------------------------------ public

    def generate_batch(self, items: list[Prepared]) -> list[Output | Exception]:
        """One result per item, in the same order: its `Output`, or the exception for it alone."""
        results: dict[int, Output | Exception] = {}  # by position in `items`
        groups: dict[tuple[Sampling, bool], list[int]] = {}
        now = time.monotonic()
        for position, item in enumerate(items):
            if item.cancelled is not None and item.cancelled():
                results[position] = RequestCancelled(f"{item.request_id} was cancelled before it ran")
            elif item.deadline is not None and now >= item.deadline:
                results[position] = DeadlineExceeded(f"{item.request_id} reached its deadline before it ran")
            else:
                groups.setdefault((item.sampling, item.constraint is not None), []).append(position)
        for positions in groups.values():
            # Never exceed the batch size the warm-up proved fits.
            for start in range(0, len(positions), self.max_batch_size):
                chunk = positions[start : start + self.max_batch_size]
                for position, result in zip(chunk, self._run_group([items[p] for p in chunk]), strict=True):
                    results[position] = result
        return [results[position] for position in range(len(items))]

    def warmup(self, max_batch_size: int | None = None, *, max_new_tokens: int = 16) -> float:
        """Generate one batch of the largest size, each row with a representative image.

        Raises on any failure, out-of-memory included: a batch size the GPU
        cannot hold must fail at start, not under traffic. Returns seconds.
        """
        from model_runtime.media import MediaLimits, decode_image
        from model_runtime.prompts import prepare, simple_chat
        from model_runtime.samples import make_sample_image

        size = max_batch_size or self.max_batch_size
        image = decode_image(make_sample_image(896, 672, seed=7), MediaLimits())
        prepared = prepare(
            self.processor, simple_chat("Describe this image in detail.", images=["file://warmup.jpg"]),
            {"file://warmup.jpg": image}, Sampling(max_new_tokens=max_new_tokens), request_id="warmup",
            context_length=self.loaded.context_length,
        )
        started = time.perf_counter()
        self._generate([prepared] * size)
        seconds = time.perf_counter() - started
        log.info("warmup_done", batch_size=size, prompt_tokens=prepared.prompt_tokens, seconds=round(seconds, 3))
        return seconds

    # ------------------------------------------------------------ internals

    def _run_group(self, items: list[Prepared]) -> list[Output | Exception]:
        import torch

        try:
            return list(self._generate(items))  # as list[Output | Exception]: list is invariant
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the traceback no longer pins the batch's tensors
        except Exception as exc:  # noqa: BLE001 - one bad group must not take the batch thread down
            # The traceback as text: renderers that expand locals would walk whole tensors.
            log.error("generate_failed", batch_size=len(items), error=repr(exc), traceback=traceback.format_exc())
            # One instance per request (each future raises its own); no `from exc`: it would pin the tensors.
            message = f"generation failed: {type(exc).__name__}: {exc}"
            return [GenerationFailed(message) for _ in items]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            log.warning("too_large_for_gpu", request_id=items[0].request_id, prompt_tokens=items[0].prompt_tokens)
            return [TooLargeForGPU(
                f"out of GPU memory even alone ({items[0].prompt_tokens} prompt tokens, "
                f"{items[0].tiles} tiles); use fewer or smaller media or fewer frames"
            )]
        self.stats.oom_splits += 1
        half = len(items) // 2
        log.warning("oom_split", batch_size=len(items), into=[half, len(items) - half])
        return self._run_group(items[:half]) + self._run_group(items[half:])

    def _generation_kwargs(self, item: Prepared) -> dict[str, Any]:
        params = item.sampling
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            # Under a grammar, the grammar alone decides when EOS may come.
            "min_new_tokens": None if item.constraint is not None else params.min_new_tokens or None,
            "do_sample": params.do_sample,
            "repetition_penalty": params.repetition_penalty,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids),
        }
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        else:  # keep the checkpoint's sampling defaults from warning on greedy calls
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate(self, items: list[Prepared]) -> list[Output]:
        import torch

        longest = max(int(item.input_ids.shape[0]) for item in items)
        padded_total = longest * len(items)
        device = self.model.device
        input_ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            length = int(item.input_ids.shape[0])
            input_ids[row, longest - length :] = item.input_ids
            attention_mask[row, longest - length :] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        pixels = [item.pixel_values for item in items if item.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(device=device, dtype=self.model.dtype)

        params = items[0].sampling
        started = time.perf_counter()
        with torch.inference_mode():
            if params.do_sample and params.seed is not None:
                torch.manual_seed(params.seed)  # one group = one Sampling, so one seed
            kwargs = self._generation_kwargs(items[0])
            if any(item.constraint is not None for item in items):
                from transformers import LogitsProcessorList

                from model_runtime.structured import GrammarLogitsProcessor

                kwargs["logits_processor"] = LogitsProcessorList([GrammarLogitsProcessor(
                    [item.constraint for item in items], longest, self.loaded.grammars.width)])
            generated = self.model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - started

        new_tokens = generated[:, longest:].tolist()
        pad_count = padded_total - sum(int(item.input_ids.shape[0]) for item in items)
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.padded_tokens += pad_count
        self.stats.total_tokens += padded_total
        self.stats.generate_seconds += seconds
        return [self._output(item, tokens, longest, seconds, len(items))
                for item, tokens in zip(items, new_tokens, strict=True)]

    def _output(self, item: Prepared, tokens: list[int], longest: int, seconds: float, batch_size: int) -> Output:
        eos_at = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens if eos_at is None else tokens[:eos_at]
        text = self._decode(kept)
        finish_reason: FinishReason = "length" if eos_at is None else "stop"
        completion_tokens = len(kept) + (0 if eos_at is None else 1)  # the stop token counts
        cut = _first_stop(text, item.sampling.stop)
        if cut is not None:
            text, finish_reason = text[:cut], "stop"
            stop = item.sampling.stop
            # Count up to the token that completed the stop string; keep the ids wholly before it.
            completion_tokens = _bisect(len(kept), lambda n: _first_stop(self._decode(kept[:n]), stop) is not None)
            kept = kept[: _bisect(len(kept), lambda n: len(self._decode(kept[:n])) > cut) - 1]
        return Output(
            request_id=item.request_id,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=item.prompt_tokens,
            completion_tokens=completion_tokens,
            generate_ms=seconds * 1000.0,
            batch_size=batch_size,
            padding_tokens=longest - int(item.input_ids.shape[0]),
            token_ids=kept,
            grammar_complete=None if item.constraint is None else
            cut is None and item.constraint.accepts(kept),  # a stop string's cut is not what the grammar saw
        )

    def _decode(self, tokens: list[int]) -> str:
        return decode_text(self.tokenizer, tokens)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest of the stop strings starts in `text`, or None."""
    found = [at for at in (text.find(s) for s in stop if s) if at >= 0]
    return min(found) if found else None


def _bisect(upper: int, reached: Callable[[int], bool]) -> int:
    """The smallest n in 1..upper with reached(n), for a condition that stays true once true."""
    low, high = 1, upper
    while low < high:
        middle = (low + high) // 2
        if reached(middle):
            high = middle
        else:
            low = middle + 1
    return low
