"""Run a micro-batch of `Prepared` requests through one `model.generate` per group.

Only the batch thread calls this. Requests batch together only when they
decode the same way (`GenerationParams.group_key()`); each group is
left-padded into one tensor, its pixel rows concatenated in order, and
generated once. Left padding with a proper attention mask gives every row
the same greedy tokens it would get alone (tests/integration/test_engine.py
checks it).

Failures: CUDA out-of-memory splits the group in halves and retries each
half, down to single requests; a request that does not fit alone fails
with too_large_for_gpu and its neighbours still run. Any other exception
fails every request of that group with internal_error; we do not bisect to
find a culprit, because requests reaching here were already validated by
`prepare` and a generate failure is a worker fault, not a request fault.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from api_client.schema import ErrorCode, JobError
from model_runtime.types import Output, Prepared

log = structlog.get_logger(__name__)


@dataclass
class EngineStats:
    batches: int = 0  # generate calls
    items: int = 0
    padded_tokens: int = 0  # pad positions added by left padding
    total_tokens: int = 0  # rows × longest prompt, summed over generate calls
    generate_seconds: float = 0.0
    oom_splits: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Engine:
    """Owns the model on the batch thread.

    `oom_above_tokens` is a test and rehearsal hook: when set, a generate
    call whose padded prompt (rows × longest prompt) exceeds it raises
    `torch.cuda.OutOfMemoryError` before touching the model, so the
    splitting path runs on machines without a GPU.
    """

    def __init__(self, loaded: Any, *, max_batch_size: int, oom_above_tokens: int | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.max_batch_size = max_batch_size
        self.oom_above_tokens = oom_above_tokens
        self.stats = EngineStats()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    # ------------------------------------------------------------ public

    def generate_batch(self, items: list[Prepared]) -> list[Output | JobError]:
        """One result per item, in the same order."""
        groups: dict[tuple, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault(item.generation.group_key(), []).append(position)
        results: list[Output | JobError | None] = [None] * len(items)
        for positions in groups.values():
            # Never exceed the batch size the warm-up proved fits.
            for start in range(0, len(positions), self.max_batch_size):
                chunk = positions[start : start + self.max_batch_size]
                for position, result in zip(chunk, self._run_group([items[p] for p in chunk])):
                    results[position] = result
        return results  # type: ignore[return-value]

    def warmup(self, max_batch_size: int | None = None, *, max_new_tokens: int = 16) -> float:
        """Generate one batch of the largest size, each row with a representative image.

        Raises on any failure, out-of-memory included: a batch size the GPU
        cannot hold must fail at start, not under traffic. Returns seconds.
        """
        from api_client.schema import GenerationParams, JobRequest
        from model_runtime.media import MediaLimits, decode_image, make_sample_image
        from model_runtime.prompts import prepare

        size = max_batch_size or self.max_batch_size
        image = decode_image(make_sample_image(896, 672, seed=7), MediaLimits())
        request = JobRequest.simple(
            "Describe this image in detail.", images=["file://warmup.jpg"],
            generation=GenerationParams(max_new_tokens=max_new_tokens),
        )
        prepared = prepare(
            self.processor, request, {"file://warmup.jpg": image}, request_id="warmup",
            context_length=self.loaded.context_length,
        )
        started = time.perf_counter()
        self._generate([prepared] * size)
        seconds = time.perf_counter() - started
        log.info("warmup_done", batch_size=size, prompt_tokens=prepared.prompt_tokens, seconds=round(seconds, 3))
        return seconds

    # ------------------------------------------------------------ internals

    def _run_group(self, items: list[Prepared]) -> list[Output | JobError]:
        import torch

        try:
            return self._generate(items)
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the traceback no longer pins the batch's tensors
        except Exception as exc:  # noqa: BLE001 - one bad group must not take the batch thread down
            # The traceback as text: renderers that expand locals would walk whole tensors.
            log.error("generate_failed", batch_size=len(items), error=repr(exc), traceback=traceback.format_exc())
            error = JobError(code=ErrorCode.internal_error, message=f"generation failed: {type(exc).__name__}: {exc}")
            return [error] * len(items)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            log.warning("too_large_for_gpu", request_id=items[0].request_id, prompt_tokens=items[0].prompt_tokens)
            return [JobError(
                code=ErrorCode.too_large_for_gpu,
                message=f"out of GPU memory even alone ({items[0].prompt_tokens} prompt tokens, "
                f"{items[0].tiles} tiles); use fewer or smaller media or fewer frames",
            )]
        self.stats.oom_splits += 1
        half = len(items) // 2
        log.warning("oom_split", batch_size=len(items), into=[half, len(items) - half])
        return self._run_group(items[:half]) + self._run_group(items[half:])

    def _generation_kwargs(self, item: Prepared) -> dict[str, Any]:
        params = item.generation
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
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
        if self.oom_above_tokens is not None and padded_total > self.oom_above_tokens:
            raise torch.cuda.OutOfMemoryError(
                f"oom_above_tokens hook: {padded_total} padded tokens > {self.oom_above_tokens}"
            )
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

        params = items[0].generation
        started = time.perf_counter()
        with torch.inference_mode():
            if params.do_sample and params.seed is not None:
                torch.manual_seed(params.seed)  # one group = one seed, see GenerationParams.group_key
            generated = self.model.generate(**inputs, **self._generation_kwargs(items[0]))
        seconds = time.perf_counter() - started

        new_tokens = generated[:, longest:].tolist()
        pad_count = padded_total - sum(int(item.input_ids.shape[0]) for item in items)
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.padded_tokens += pad_count
        self.stats.total_tokens += padded_total
        self.stats.generate_seconds += seconds
        return [self._output(item, tokens, longest, seconds, len(items)) for item, tokens in zip(items, new_tokens)]

    def _output(self, item: Prepared, tokens: list[int], longest: int, seconds: float, batch_size: int) -> Output:
        stop_at = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens if stop_at is None else tokens[:stop_at]
        return Output(
            request_id=item.request_id,
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            finish_reason="length" if stop_at is None else "stop",
            prompt_tokens=item.prompt_tokens,
            completion_tokens=len(kept) + (0 if stop_at is None else 1),  # the stop token counts
            generate_ms=seconds * 1000.0,
            batch_size=batch_size,
            padding_tokens=longest - int(item.input_ids.shape[0]),
        )
