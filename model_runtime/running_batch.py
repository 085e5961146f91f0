"""The continuous engine's state: the running batch (KV cache + every row), the joiners, the counters.

Like TGI's `CausalLMBatch`, continuous batching is a few named operations
on one type: `from_prefill` (requests whose prompts are prefilled become a
batch), `concatenate` (requests join), `filter` (requests leave) and
`decode` (one token for every row). The cache is a transformers
`DynamicCache`, left-padded to the longest row: a row's keys sit at the
right end, the attention mask hides the pad columns, and each row's
position ids are its own, so every row computes exactly what it would
alone. Columns that no row uses any more are dropped when rows leave.
Only the public cache API is used: iterating a `DynamicCache` gives each
layer's keys and values, `DynamicCache(ddp_cache_data=...)` builds one, and
`batch_select_indices` keeps rows.

`report_progress` hands each running row's ids so far to its request's
`on_progress` hook (model_runtime/types.py), throttled per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from transformers import DynamicCache

from model_runtime.text import decode_text
from model_runtime.types import FinishReason, Output, Prepared

log = structlog.get_logger(__name__)


@dataclass(eq=False)  # identity: rows and joiners are looked up in lists
class Row:
    """One request's decoding state."""

    prepared: Prepared
    prompt_ids: torch.Tensor  # on the model's device
    generator: torch.Generator | None
    added_at: float
    admitted_at: float
    generated: list[int] = field(default_factory=list)
    peak_batch: int = 1
    text: str = ""  # decoded output so far, kept only for rows with stop strings
    progress_at: float | None = None  # when its hook was last called (or its first decode step)
    progress_off: bool = False  # its hook raised: not called again
    matcher: Any = None  # its grammar's llguidance matcher (model_runtime/structured.py), if it has a format

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    def output(self, tokenizer: Any, reason: FinishReason, *, text: str | None = None,
               completion: int | None = None) -> Output:
        """The row's result, now: its text (or `text`, cut at a stop string) and its counts."""
        return Output(
            request_id=self.request_id,
            text=decode_text(tokenizer, self.generated) if text is None else text,
            finish_reason=reason,
            prompt_tokens=self.prepared.prompt_tokens,
            completion_tokens=len(self.generated) if completion is None else completion,
            generate_ms=(time.monotonic() - self.admitted_at) * 1000.0,
            batch_size=self.peak_batch,
            padding_tokens=0,
            token_ids=list(self.generated),
            wait_ms=(self.admitted_at - self.added_at) * 1000.0,
            # A text cut at a stop string is not what the grammar saw: never claimed complete.
            grammar_complete=None if self.matcher is None else text is None and self.matcher.is_accepting(),
        )

    def seen(self) -> torch.Tensor:
        """Prompt ids + generated ids (what repetition penalty looks at); built only when asked."""
        if not self.generated:
            return self.prompt_ids
        return torch.cat([self.prompt_ids, self.prompt_ids.new_tensor(self.generated)])


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class ContinuousStats:
    steps: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of running-batch sizes over decode steps
    prefill_chunks: int = 0
    prefill_tokens: int = 0
    vision_calls: int = 0
    vision_tiles: int = 0
    preempted: int = 0
    join_ooms: int = 0
    max_decode_stall_ms: float = 0.0  # longest vision + prefill time in one step while rows were decoding
    generate_seconds: float = 0.0  # time inside step()
    vision_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


@dataclass(eq=False)
class Joining:
    """Admitted, not decoding yet: vision features, then a chunked prefill into a cache of its own."""

    row: Row
    features: list[torch.Tensor] = field(default_factory=list)
    tiles_done: int = 0
    embeds: torch.Tensor | None = None  # (1, prompt, hidden) once every tile is encoded
    cache: DynamicCache = field(default_factory=DynamicCache)
    prefilled: int = 0

    @property
    def prepared(self) -> Prepared:
        return self.row.prepared

    def tile_pixels(self, start: int, count: int) -> torch.Tensor:
        """`count` rows of the request's pixel values from `start` (only requests with tiles reach the tower)."""
        pixels = self.prepared.pixel_values
        if pixels is None:
            raise RuntimeError(f"{self.prepared.request_id} has no tiles to encode")
        return pixels[start : start + count]

    @property
    def ready_embeds(self) -> torch.Tensor:
        """`embeds`, for prefill (only requests whose tiles are all encoded reach it)."""
        if self.embeds is None:
            raise RuntimeError(f"{self.prepared.request_id} reached prefill before its prompt was embedded")
        return self.embeds


def _stack_right(parts: list[torch.Tensor], columns: int) -> torch.Tensor:
    """The rows of (batch, heads, length, dim) tensors in one, each right-aligned in `columns`: one copy."""
    first = parts[0]
    out = first.new_zeros((sum(p.shape[0] for p in parts), first.shape[1], columns, first.shape[3]))
    row = 0
    for part in parts:
        out[row : row + part.shape[0], :, columns - part.shape[2] :] = part
        row += part.shape[0]
    return out


class RunningBatch:
    """Rows decoding together; the model thread owns it."""

    def __init__(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
                 next_ids: torch.Tensor) -> None:
        self.rows = rows
        self.alive = [True] * len(rows)  # a finished row stays (masked work) until `compact`
        self.cache = cache
        self.mask = mask  # (rows, columns) 1 where the row has a cached token
        self.positions = positions  # (rows,) position id of the token fed next
        self.next_ids = next_ids  # (rows,) token fed next: each row's last chosen token

    @classmethod
    def from_prefill(cls, rows: list[Row], cache: DynamicCache, mask: torch.Tensor,
                     first_tokens: list[int]) -> RunningBatch:
        """Rows whose prompts are prefilled in `cache` (`mask`: rows x columns, 1 where a row has a token)."""
        return cls(rows, cache, mask, mask.sum(dim=1), torch.tensor(first_tokens, device=mask.device))

    def __len__(self) -> int:
        """Rows still decoding."""
        return sum(self.alive)

    def live(self) -> list[tuple[int, Row]]:
        return [(i, row) for i, row in enumerate(self.rows) if self.alive[i]]

    def retire(self, index: int) -> None:
        """The row is done; its slot is freed at the next `compact` (copying the cache per leaver costs
        about a decode step, so leavers are gathered)."""
        self.alive[index] = False

    @property
    def retired(self) -> int:
        return len(self.rows) - len(self)

    def compact(self) -> None:
        """Drop the retired rows, then the pad columns nobody needs."""
        self.filter([i for i, alive in enumerate(self.alive) if alive])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def concatenate(self, others: list[RunningBatch]) -> None:
        """The rows of `others` join, all at once; every cache is left-padded to the longest."""
        batches = [self, *others]
        columns = max(b.columns for b in batches)
        layers = [(_stack_right([k for k, _ in per_layer], columns), _stack_right([v for _, v in per_layer], columns))
                  for per_layer in zip(*[[(k, v) for k, v, *_ in b.cache] for b in batches], strict=True)]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_left_pad(b.mask, columns, 1) for b in batches])
        self.positions = torch.cat([b.positions for b in batches])
        self.next_ids = torch.cat([b.next_ids for b in batches])
        for other in others:
            self.rows.extend(other.rows)
            self.alive.extend(other.alive)

    def filter(self, keep: list[int]) -> None:
        """Keep these rows (indices into `rows`), then drop the pad columns nobody needs."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.next_ids = self.next_ids[index]
        self.rows = [self.rows[i] for i in keep]
        self.alive = [self.alive[i] for i in keep]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.columns
        if first > 0:
            self.cache = DynamicCache(ddp_cache_data=[(k[:, :, first:], v[:, :, first:]) for k, v, *_ in self.cache])
            self.mask = self.mask[:, first:]

    def decode(self, model: Any) -> torch.Tensor:
        """One forward for every row: feed each row's last token, return the next-token logits (rows × vocab)."""
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        try:
            out = model(input_ids=self.next_ids[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                        past_key_values=self.cache, use_cache=True)
        except BaseException:
            # Layers that stored this step's keys before the failure give them back.
            self.cache = DynamicCache(ddp_cache_data=[(k[:, :, : self.columns], v[:, :, : self.columns])
                                                      for k, v, *_ in self.cache])
            raise
        self.mask = mask
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        decoding = len(self)
        for _, row in self.live():
            row.peak_batch = max(row.peak_batch, decoding)
        return out.logits[:, -1, :]

    def set_next(self, tokens: list[int]) -> None:
        self.next_ids = torch.tensor(tokens, dtype=torch.long, device=self.next_ids.device)

    def report_progress(self, now: float, interval: float) -> None:
        """Call each live row's `on_progress` with a copy of its ids so far, at most every `interval`
        seconds (the first call `interval` after its first decode step). Rows that ended are not live."""
        for _, row in self.live():
            hook = row.prepared.on_progress
            if hook is None or row.progress_off:
                continue
            if row.progress_at is None:
                row.progress_at = now
            if now - row.progress_at < interval or not row.generated:
                continue
            row.progress_at = now
            try:
                hook(tuple(row.generated))
            except Exception as exc:  # noqa: BLE001 - a broken hook costs its progress, never its request
                row.progress_off = True
                log.warning("progress_hook_failed", request_id=row.request_id, error=repr(exc))

