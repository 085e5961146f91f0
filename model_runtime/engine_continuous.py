"""The continuous (iteration-level) engine: requests join and leave a running batch at step boundaries.

Only the model thread calls it. Each `step()`:
1. drops the requests that were cancelled or are past their deadline;
2. admits waiting requests, interactive ones before batch-class ones (a batch
   file's jobs), then by arrival, while there is room: `max_batch_size` rows and a
   KV budget in tokens (`max_batch_tokens`, counted as the batch's padded
   worst case: rows × the longest prompt + max_new_tokens among them);
   while rows decode and under a quarter of the cap is free, joins are
   gathered for at most `JOIN_DEFER_STEPS` steps (one prefill, not one each)
   (model_runtime/engine_admission.py). An interactive request waiting
   behind a batch full of batch-class rows preempts the newest of them
   (recomputed when it rejoins: its output is unchanged);
3. runs the vision tower once over the next tiles of the joining requests
   (at most `vision_chunk_tiles` per joining request; tiles are all one
   size, so nothing pads) and splits the features back per request; tiles
   the vision cache holds, or repeated within the call, are not computed
   again (model_runtime/engine_vision.py, model_runtime/vision_cache.py);
4. prefills joining requests from `inputs_embeds`, at most
   `prefill_chunk_tokens` prompt tokens per joining request a step: whole
   prompts of similar length in one left-padded forward
   (model_runtime/prefill.py), longer ones in chunks, so a 12-tile prompt
   cannot stall the running rows for its whole length. Budgets per joiner
   (not per step) refill the rows that left in one step: short jobs leave
   together and would otherwise trickle back one chunk a step while the
   batch runs below its cap. With no row running, budgets are at least 8
   chunks: nobody waits. A finished prefill joins the running batch
   (`RunningBatch.concatenate`);
5. decodes one token for every running row, each with its own sampling, and
   resolves those that ended: EOS, their own max_new_tokens or a stop string.
   Rows with a response_format decode under their grammar's token mask, filled
   while the forward runs, and end when the grammar is complete
   (model_runtime/structured.py). A row that ended is masked work until a
   quarter of the batch has ended (then `compact`), because freeing its slot
   copies the whole cache;
6. hands each running row's ids so far to its request's `on_progress` hook,
   at most every `progress_interval_s` per request (`RunningBatch.report_progress`).

Failures stay per request: out of memory while joining puts the joiners back
to wait (fewer at a time, or until the running batch shrinks); out of memory
mid-decode preempts the newest row, which is queued again to be recomputed;
a request that cannot fit alone raises `TooLargeForGPU`; any other exception
fails only the requests of the computation that raised.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
import torch

from model_runtime.engine_admission import Admission
from model_runtime.engine_vision import VisionStep
from model_runtime.running_batch import ContinuousStats, Joining, Row, RunningBatch
from model_runtime.engine_memory import MemoryPolicy, as_failure
from model_runtime.prefill import chunk_prefill, padded_prefill, similar_length_groups
from model_runtime.sampling import choose_tokens
from model_runtime.structured import StructuredDecoding
from model_runtime.text import cut_at_stop, decode_text
from model_runtime.types import DeadlineExceeded, GenerationFailed, Output, Prepared, RequestCancelled
from model_runtime.vision_cache import DEFAULT_VISION_CACHE_MB, VisionCache

log = structlog.get_logger(__name__)

Finished = tuple[Prepared, "Output | BaseException"]
PROGRESS_INTERVAL_S = 0.25  # a request's on_progress hook, at most this often


class ContinuousEngine(Admission, VisionStep, MemoryPolicy):
    def __init__(self, loaded: Any, *, max_batch_size: int, max_batch_tokens: int,
                 prefill_chunk_tokens: int = 512, vision_chunk_tiles: int = 8,
                 progress_interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 vision_cache_mb: float = DEFAULT_VISION_CACHE_MB) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.processor.tokenizer
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.vision_chunk_tiles = vision_chunk_tiles
        self.progress_interval_s = progress_interval_s
        self.clock = clock  # the progress hooks' clock (tests step a fake one)
        self.device = self.model.device
        self.attn_implementation = loaded.attn_implementation
        self.image_token_id = int(self.model.config.image_token_id)
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.stats = ContinuousStats()
        self.vision_cache = VisionCache.of_mb(vision_cache_mb)  # per-tile features; 0 MB: off
        self.structured = StructuredDecoding(loaded.grammars)  # rows with a response_format
        self._waiting: deque[tuple[Prepared, float]] = deque()  # (request, added_at)
        self._joining: list[Joining] = []
        self._running: RunningBatch | None = None
        self._ready: list[RunningBatch] = []  # prefilled this step, joining at the step's end
        self._join_limit = max_batch_size  # halved when joiners run out of memory together
        self._admit_below: int | None = None  # after a join OOM: wait until fewer rows run than this
        self._deferred = 0  # steps the head of the queue has held back to join with others

    # ------------------------------------------------------------ the driver's side
    def add(self, prepared: Prepared) -> None:
        """Queue it: interactive requests before batch-class ones (`Prepared.batch_class`), then by arrival."""
        entry = (prepared, time.monotonic())
        if prepared.batch_class or not self._waiting or not self._waiting[-1][0].batch_class:
            self._waiting.append(entry)
            return
        ahead = [e for e in self._waiting if not e[0].batch_class]
        self._waiting = deque([*ahead, entry, *(e for e in self._waiting if e[0].batch_class)])

    def has_work(self) -> bool:
        return bool(self._waiting or self._joining or self._running)

    def take_waiting(self) -> list[Prepared]:
        """Requests not admitted yet, removed (draining hands them back)."""
        taken = [p for p, _ in self._waiting]
        self._waiting.clear()
        return taken

    def abort(self, error: type[BaseException] | BaseException) -> list[Finished]:
        """End every request still here with `error` (drain timeout, shutdown)."""
        everyone = [p for p, _ in self._waiting] + [j.prepared for j in self._joining]
        everyone += [r.prepared for _, r in self._running.live()] if self._running else []
        self._waiting.clear()
        self._joining = []
        self._running = None
        return [(p, error if isinstance(error, BaseException) else error("aborted")) for p in everyone]

    def step(self) -> list[Finished]:
        started = time.perf_counter()
        finished: list[Finished] = []
        with torch.inference_mode():
            self._drop_stopped(finished)
            self._admit(finished)
            decoding = self._running is not None
            work_before = self.stats.vision_calls + self.stats.prefill_chunks
            join_started = time.perf_counter()
            scale = self._budget_scale(decoding)
            self._encode_tiles(finished, self.vision_chunk_tiles * scale)
            vision_done = time.perf_counter()
            self._prefill(finished, self.prefill_chunk_tokens * scale)
            self._merge_ready()
            decode_started = time.perf_counter()
            if decoding and self.stats.vision_calls + self.stats.prefill_chunks > work_before:
                stall_ms = (decode_started - join_started) * 1000.0  # the running rows waited this long
                self.stats.max_decode_stall_ms = max(self.stats.max_decode_stall_ms, stall_ms)
            self._decode(finished)
            if self._running is not None:
                self._running.report_progress(self.clock(), self.progress_interval_s)
        self.stats.vision_seconds += vision_done - join_started
        self.stats.prefill_seconds += decode_started - vision_done
        self.stats.decode_seconds += time.perf_counter() - decode_started
        self.stats.steps += 1
        self.stats.generate_seconds += time.perf_counter() - started
        return finished

    def warmup(self, batch_size: int | None = None, *, max_new_tokens: int = 16) -> float:
        """Run the largest batch of 12-tile image requests; raise on any failure. Returns seconds."""
        from model_runtime.capacity import warm_up

        return warm_up(self, batch_size or self.max_batch_size, max_new_tokens=max_new_tokens)

    def run_until_done(self, items: list[Prepared]) -> list[Output | BaseException]:
        """Add `items`, step until each has ended; results in the same order (tests, warm-up, benchmarks)."""
        for item in items:
            self.add(item)
        results: dict[int, Output | BaseException] = {}
        while len(results) < len(items):
            for prepared, result in self.step():
                results[id(prepared)] = result
        return [results[id(item)] for item in items]

    # ------------------------------------------------------------ 1. cancelled, past deadline
    def _stop_reason(self, prepared: Prepared, now: float) -> BaseException | None:
        if prepared.cancelled is not None and prepared.cancelled():
            return RequestCancelled(f"{prepared.request_id} cancelled")
        if prepared.deadline is not None and now >= prepared.deadline:
            return DeadlineExceeded(f"{prepared.request_id} still unfinished at its deadline")
        return None

    def _drop_stopped(self, finished: list[Finished]) -> None:
        now = time.monotonic()
        for entry in list(self._waiting):
            if (reason := self._stop_reason(entry[0], now)) is not None:
                self._waiting.remove(entry)
                finished.append((entry[0], reason))
        for joining in list(self._joining):
            if (reason := self._stop_reason(joining.prepared, now)) is not None:
                self._joining.remove(joining)
                finished.append((joining.prepared, reason))
        if self._running is not None:
            for index, row in self._running.live():
                if (reason := self._stop_reason(row.prepared, now)) is not None:
                    finished.append((row.prepared, reason))
                    self._running.retire(index)
            self._after_leaving()

    # ------------------------------------------------------------ 4. prefill
    def _prefill(self, finished: list[Finished], budget: int) -> None:
        """Spend this step's prompt-token budget: whole prompts in groups of similar length, the rest in chunks."""
        whole: list[Joining] = []
        chunks: list[tuple[Joining, int]] = []  # (joiner, prefill up to)
        for joining in self._joining:
            if joining.embeds is None or budget <= 0:
                continue
            length = int(joining.embeds.shape[1])
            if joining.prefilled == 0 and length <= budget:
                whole.append(joining)
                budget -= length
            else:
                take = min(length - joining.prefilled, budget)
                chunks.append((joining, joining.prefilled + take))
                budget -= take
        groups = [[whole[i] for i in group]
                  for group in similar_length_groups([int(j.ready_embeds.shape[1]) for j in whole])]
        for group in groups:
            if len(group) == 1:  # alone: no padding, no mask
                chunks.insert(0, (group[0], int(group[0].ready_embeds.shape[1])))
            elif not self._prefill_group(group, finished):
                return
        for joining, end in chunks:
            if not self._prefill_chunk(joining, end, finished):
                return  # after an OOM the others try again next step, within the lowered limits

    def _prefill_group(self, group: list[Joining], finished: list[Finished]) -> bool:
        try:
            logits, cache, mask = padded_prefill(self.model, [j.ready_embeds for j in group])
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                self._joining_failed(group, exc, finished)
                return False
            for joining in group:  # find the one that fails: each alone
                self._prefill_chunk(joining, int(joining.ready_embeds.shape[1]), finished)
            return True
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += int(mask.sum())
        first: list[int | None] = []
        for index, joining in enumerate(group):
            joining.prefilled = int(joining.ready_embeds.shape[1])
            first.append(self._joined(joining, logits[index : index + 1], finished))
        keep = [index for index, token in enumerate(first) if token is not None]
        if keep:  # the rows that did not end on their first token
            batch = RunningBatch.from_prefill([j.row for j in group], cache, mask, [t or 0 for t in first])
            batch.filter(keep)
            self._ready.append(batch)
        return True

    def _prefill_chunk(self, joining: Joining, end: int, finished: list[Finished]) -> bool:
        start = joining.prefilled
        try:
            out = chunk_prefill(self.model, joining.ready_embeds, joining.cache, start, end)
        except Exception as exc:  # noqa: BLE001
            self._joining_failed([joining], exc, finished)
            return not isinstance(exc, torch.cuda.OutOfMemoryError)
        joining.cache, joining.prefilled = out.past_key_values, end
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += end - start
        if end < joining.ready_embeds.shape[1]:
            return True
        if (token := self._joined(joining, out.logits[:, -1, :], finished)) is not None:
            mask = torch.ones((1, end), dtype=torch.long, device=self.device)
            self._ready.append(RunningBatch.from_prefill([joining.row], joining.cache, mask, [token]))
        return True

    def _joined(self, joining: Joining, logits: torch.Tensor, finished: list[Finished]) -> int | None:
        """The joiner's prompt is prefilled: its first token, or None when that already ended it."""
        self._joining.remove(joining)
        self._join_limit = min(self.max_batch_size, self._join_limit + 1)
        return self._start_decoding(joining, logits, finished)

    def _start_decoding(self, joining: Joining, logits: torch.Tensor, finished: list[Finished]) -> int | None:
        row = joining.row
        token = choose_tokens(logits, [row.prepared.sampling], [row.seen], [row.generator], generated=[0],
                              eos_ids=self.eos_ids, masks=self.structured.now(row.matcher))[0]
        return None if self._advance(row, token, finished) else token

    def _merge_ready(self) -> None:
        """Requests prefilled this step join the running batch, in one copy of the cache."""
        if not self._ready:
            return
        ready, self._ready = self._ready, []
        if self._running is None:
            self._running = ready.pop(0)
        if ready:
            if self._running.retired:
                self._running.compact()  # the join copies the cache anyway; leave the dead rows out of it
            self._running.concatenate(ready)

    # ------------------------------------------------------------ 5. decode
    def _decode(self, finished: list[Finished]) -> None:
        batch = self._running
        if batch is None:
            return
        pending = self.structured.start([r.matcher for r in batch.rows], batch.alive)  # fills during the forward
        try:
            logits = batch.decode(self.model)
        except torch.cuda.OutOfMemoryError:
            self._decode_oom(finished)
            return
        except Exception as exc:  # noqa: BLE001 - every running row was touched by this forward
            log.error("decode_failed", rows=len(batch), error=repr(exc), traceback=traceback.format_exc())
            finished.extend((row.prepared, as_failure(exc)) for _, row in batch.live())
            self._running = None
            return
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(batch)
        rows = batch.rows  # retired ones included: their tokens are computed and ignored
        tokens = choose_tokens(logits, [r.prepared.sampling for r in rows], [r.seen for r in rows],
                               [r.generator for r in rows], generated=[len(r.generated) for r in rows],
                               eos_ids=self.eos_ids, masks=pending.wait(), apply_masks=self.structured.apply)
        batch.set_next(tokens)
        for index, row in batch.live():
            if self._advance(row, tokens[index], finished):
                batch.retire(index)
        self._after_leaving()

    def _after_leaving(self) -> None:
        """Free the rows that left once they are a quarter of the batch (or all of it)."""
        batch = self._running
        if batch is None:
            return
        if not len(batch):
            self._running = None
        elif batch.retired * 4 >= len(batch.rows):
            batch.compact()

    # ------------------------------------------------------------ one token more
    def _advance(self, row: Row, token: int, finished: list[Finished]) -> bool:
        """Record `token` for `row`; True (and its Output in `finished`) when the row is done."""
        sampling = row.prepared.sampling
        if token in self.eos_ids:
            finished.append((row.prepared, row.output(self.tokenizer, "stop", completion=len(row.generated) + 1)))
            return True
        row.generated.append(token)
        if row.matcher is not None and not row.matcher.consume_token(token):  # the mask allowed it: a bug
            finished.append((row.prepared, GenerationFailed(f"grammar refused token {token}: "
                                                            f"{row.matcher.get_error()[:300]}")))
            return True
        if sampling.stop:
            text = decode_text(self.tokenizer, row.generated)
            if (cut := cut_at_stop(text, sampling.stop)) is not None:
                finished.append((row.prepared, row.output(self.tokenizer, "stop", text=cut)))
                return True
        if row.matcher is not None and row.matcher.is_stopped():  # complete: only EOS could follow
            finished.append((row.prepared, row.output(self.tokenizer, "stop")))
            return True
        if len(row.generated) >= sampling.max_new_tokens:
            finished.append((row.prepared, row.output(self.tokenizer, "length")))
            return True
        return False

