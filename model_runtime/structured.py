"""Structured output on the model thread: llguidance matchers, their token masks, and how masks meet logits.

- `Grammars` is built once per model, at load: llguidance's view of the
  tokenizer (as wide as the logits, with every stop id) and a cache of
  compiled matchers per grammar. A task thread asks it for a `Constraint`
  (compiling on a miss, off the step loop); the engine gives each admitted row
  its own copy (`Constraint.matcher()`, a deep copy: tens of microseconds).
- `StructuredDecoding` fills the masks of a running batch's constrained rows on
  a thread of its own while the forward runs (`fill_next_token_bitmask_par`
  releases the GIL) and hands them to `choose_tokens` as `RowMasks`, which
  sets every token the grammar forbids to -inf on those rows only, before their
  sampling settings. Rows without a constraint are never touched.
- `GrammarLogitsProcessor` does the same inside `model.generate` (the static engine).

A preempted row is recomputed from scratch with a fresh copy of the matcher:
reset, then replayed by the recompute itself.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import structlog
import torch
from llguidance import LLMatcher
from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

from model_runtime.types import RequestError

log = structlog.get_logger(__name__)

CACHE_SIZE = 128  # compiled grammars kept per model


class Constraint:
    """One compiled grammar; each row decoding under it gets its own matcher."""

    def __init__(self, prototype: LLMatcher) -> None:
        self._prototype = prototype

    def matcher(self) -> LLMatcher:
        return self._prototype.deep_copy()

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether these tokens form a complete output under the grammar (replayed on a fresh matcher)."""
        matcher = self.matcher()
        return matcher.consume_tokens(list(tokens)) and matcher.is_accepting()


class Grammars:
    """llguidance's tokenizer for one model (built once, at load) and the per-grammar cache."""

    def __init__(self, hf_tokenizer: Any, *, vocab_width: int, stop_ids: Iterable[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self.width = vocab_width  # the logits' width, which may exceed len(tokenizer)
        self.stop_ids = sorted(stop_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_width, eos_token=self.stop_ids)
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiles = 0

    def constraint(self, grammar: str) -> Constraint:
        """The constraint for an llguidance grammar (api_client/formats.py made it); raises RequestError."""
        with self._lock:
            found = self._cache.get(grammar)
            if found is not None:
                self._cache.move_to_end(grammar)
                return found
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)  # compiles with the GIL released
        if matcher.is_error():
            raise RequestError("invalid_schema", f"the response_format does not compile: {matcher.get_error()[:500]}")
        constraint = Constraint(matcher)
        with self._lock:
            self.compiles += 1
            self._cache[grammar] = constraint
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return constraint


def build_grammars(hf_tokenizer: Any, model: Any) -> Grammars:
    """At model load: the width of the model's logits and every stop id it may end with."""
    width = int(model.get_output_embeddings().weight.shape[0])
    eos = model.generation_config.eos_token_id
    eos = hf_tokenizer.eos_token_id if eos is None else eos
    return Grammars(hf_tokenizer, vocab_width=width, stop_ids=eos if isinstance(eos, (list, tuple)) else [eos])


@dataclass
class RowMasks:
    """Token bitmasks (int32, one bit per token) for some rows of a batch's logits."""

    rows: list[int]  # indices into the logits' rows
    bitmask: torch.Tensor  # (batch rows, ceil(width / 32)); only `rows` are filled

    def apply(self, logits: torch.Tensor) -> None:
        """In place: -inf on every token a constrained row's grammar forbids."""
        words = self.bitmask.numpy()
        if len(self.rows) != words.shape[0]:
            words = words[self.rows]
        # Bit j of word w is token 32w + j: little-endian bytes, little-endian bits (one numpy call).
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
        forbidden = torch.from_numpy(bits == 0).to(logits.device, non_blocking=True)
        if self.rows == list(range(logits.shape[0])):
            logits.masked_fill_(forbidden, float("-inf"))
            return
        for i, row in enumerate(self.rows):  # in place, row by row: no gather and scatter of whole rows
            logits[row].masked_fill_(forbidden[i], float("-inf"))


@dataclass
class MaskStats:
    steps: int = 0  # decode steps with at least one constrained row
    rows: int = 0  # constrained rows over those steps
    fill_seconds: float = 0.0  # on the fill thread, overlapping the forward
    wait_seconds: float = 0.0  # the model thread waiting for a fill after its forward
    apply_seconds: float = 0.0  # masks onto logits, on the model thread


class Pending:
    """A fill in flight; `wait()` gives its masks (None when the batch has no constrained row)."""

    def __init__(self, stats: MaskStats, future: Future[RowMasks] | None = None) -> None:
        self.stats, self.future = stats, future

    def wait(self) -> RowMasks | None:
        if self.future is None:
            return None
        started = time.perf_counter()
        masks = self.future.result()
        self.stats.wait_seconds += time.perf_counter() - started
        self.future = None
        return masks


class StructuredDecoding:
    """The continuous engine's side: masks for its rows, filled while the forward runs."""

    def __init__(self, grammars: Grammars | None) -> None:
        self.grammars = grammars
        self.stats = MaskStats()
        self._executor: Any = None
        self._thread: ThreadPoolExecutor | None = None
        self._pending = Pending(self.stats)

    def _words(self, batch_rows: int) -> torch.Tensor:
        assert self.grammars is not None  # a row has a matcher only when the model has grammars
        return torch.full((batch_rows, (self.grammars.width + 31) // 32), -1, dtype=torch.int32)

    def start(self, matchers: Sequence[LLMatcher | None], alive: Sequence[bool]) -> Pending:
        """Begin filling the masks of the live rows that have a matcher, on the fill thread."""
        self._pending.wait()  # never two fills over the same matchers
        work = [(m, i) for i, (m, live) in enumerate(zip(matchers, alive, strict=True)) if m is not None and live]
        if not work:
            return Pending(self.stats)
        if self._thread is None:
            self._executor = llguidance.LLExecutor()
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        bitmask = self._words(len(matchers))
        self.stats.steps += 1
        self.stats.rows += len(work)
        self._pending = Pending(self.stats, self._thread.submit(self._fill, work, bitmask))
        return self._pending

    def _fill(self, work: list[tuple[LLMatcher, int]], bitmask: torch.Tensor) -> RowMasks:
        started = time.perf_counter()
        try:
            fill_next_token_bitmask_par(self._executor, work, bitmask)
        except Exception as exc:  # noqa: BLE001 - a bug here must fail its rows, not the engine
            # Unmasked, a row's next token breaks its grammar and `consume_token` fails that row alone.
            log.error("grammar_mask_failed", rows=len(work), error=repr(exc))
            return RowMasks([], bitmask)
        self.stats.fill_seconds += time.perf_counter() - started
        return RowMasks([i for _, i in work], bitmask)

    def now(self, matcher: LLMatcher | None) -> RowMasks | None:
        """The mask of one row, on this thread (a row's first token, right after its prefill)."""
        if matcher is None:
            return None
        bitmask = self._words(1)
        fill_next_token_bitmask(matcher, bitmask, 0)
        return RowMasks([0], bitmask)

    def apply(self, masks: RowMasks, logits: torch.Tensor) -> None:
        started = time.perf_counter()
        masks.apply(logits)
        self.stats.apply_seconds += time.perf_counter() - started


class GrammarLogitsProcessor:
    """A transformers logits processor for `model.generate`: row i decodes under `constraints[i]` (or freely)."""

    def __init__(self, constraints: Sequence[Constraint | None], prompt_length: int, width: int) -> None:
        self.matchers = [c.matcher() if c is not None else None for c in constraints]
        self.prompt_length = prompt_length
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        fresh = input_ids.shape[1] == self.prompt_length
        rows = []
        bitmask = torch.full((len(self.matchers), (self.width + 31) // 32), -1, dtype=torch.int32)
        for row, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            if not fresh and not matcher.is_stopped():  # once stopped, the row ended: generate feeds it pads
                matcher.consume_token(int(input_ids[row, -1]))
            fill_next_token_bitmask(matcher, bitmask, row)  # complete: only the stop ids are left
            rows.append(row)
        if rows:
            scores = scores.clone()
            RowMasks(rows, bitmask).apply(scores)
        return scores
