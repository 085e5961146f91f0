"""Which waiting requests join the continuous engine's running batch, and how much they may do per step.

- `_admit`: while there is room (`max_batch_size` rows, and the KV budget
  `max_batch_tokens` counted as the padded worst case: rows × the longest
  prompt + max_new_tokens among them), in the queue's order: interactive
  requests before batch-class ones (`Prepared.batch_class`: a batch file's
  jobs), then by arrival; a request over the budget even alone ends
  `TooLargeForGPU` before it touches the model.
- `_preempt_for_interactive`: an interactive request that heads the queue and
  finds no room takes it from batch-class requests: the newest joining one goes
  back to the queue (its tiles stay in the vision cache), else the newest
  running one is preempted through the out-of-memory path's `_preempt`
  (model_runtime/engine_memory.py): recomputed from scratch when it rejoins, so
  its output is unchanged.
- `_defer_join`: while rows decode and under a quarter of the cap is free,
  joins are gathered for at most `JOIN_DEFER_STEPS` steps (one prefill, not one each),
  or until the rows about to reach their max_new_tokens (within `JOIN_WAVE_STEPS`) have;
  never while an interactive request waits behind batch-class rows.
- `_budget_scale`: this step's vision and prefill budgets, in chunks.

A mixin of `ContinuousEngine` (model_runtime/engine_continuous.py), like
`MemoryPolicy`: it works on that engine's queues and limits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from model_runtime.running_batch import Joining, Row, RunningBatch
from model_runtime.sampling import new_generator
from model_runtime.types import Prepared, TooLargeForGPU

IDLE_BUDGET_SCALE = 8  # vision and prefill chunks per step at least, while no row is decoding
JOIN_DEFER_STEPS = 4  # a waiting request holds back at most this many steps to join with others
JOIN_WAVE_STEPS = 16  # ... or until running rows that end within this many steps have ended


class Admission:
    # The engine's state this works on (set by ContinuousEngine.__init__).
    max_batch_size: int
    max_batch_tokens: int
    device: Any
    _waiting: deque[tuple[Prepared, float]]
    _joining: list[Joining]
    _running: RunningBatch | None
    _join_limit: int
    _admit_below: int | None
    _deferred: int
    _preempt: Callable[[int, str], None]  # MemoryPolicy's

    @property
    def active(self) -> int:
        return len(self._joining) + (len(self._running) if self._running else 0)

    def _budget_scale(self, decoding: bool) -> int:
        """This step's vision and prefill budgets, in chunks: one per joining request, so rows that
        left are refilled in one step instead of one chunk a step while the batch runs below its cap
        (short jobs leave faster than that); at least `IDLE_BUDGET_SCALE` while no row decodes."""
        joining = len(self._joining)
        return max(joining, IDLE_BUDGET_SCALE) if not decoding else max(joining, 1)

    def _worst_case_kv(self, extra: Prepared) -> int:
        """Padded KV tokens if `extra` joined and every row ran to its max_new_tokens."""
        rows = [j.prepared for j in self._joining] + [extra]
        rows += [r.prepared for r in self._running.rows] if self._running else []
        return len(rows) * max(p.prompt_tokens + p.sampling.max_new_tokens for p in rows)

    def _admit(self, finished: list) -> None:
        running = len(self._running) if self._running else 0
        if self._admit_below is not None:
            if running >= self._admit_below:
                return
            self._admit_below = None
        self._preempt_for_interactive()
        if self._defer_join(running):
            return
        while self._waiting and self.active < self.max_batch_size and len(self._joining) < self._join_limit:
            prepared, added_at = self._waiting[0]
            alone = prepared.prompt_tokens + prepared.sampling.max_new_tokens
            if alone > self.max_batch_tokens:
                self._waiting.popleft()
                finished.append((prepared, TooLargeForGPU(
                    f"prompt {prepared.prompt_tokens} + max_new_tokens {prepared.sampling.max_new_tokens} tokens "
                    f"exceed this worker's KV budget of {self.max_batch_tokens}; use fewer or smaller media, "
                    "fewer frames or fewer new tokens")))
                continue
            if self.active and self._worst_case_kv(prepared) > self.max_batch_tokens:
                return  # in order: it joins when rows leave
            self._waiting.popleft()
            row = Row(prepared=prepared, prompt_ids=prepared.input_ids.to(self.device),
                      generator=new_generator(prepared.sampling, self.device), added_at=added_at,
                      admitted_at=time.monotonic(),
                      # A fresh matcher also when a preempted row is recomputed: reset, then replayed.
                      matcher=prepared.constraint.matcher() if prepared.constraint is not None else None)
            self._joining.append(Joining(row))
            if not prepared.batch_class and any(j.prepared.batch_class for j in self._joining):
                # Interactive joiners first: the step's vision and prefill budgets are spent in this order.
                self._joining.sort(key=lambda j: j.prepared.batch_class)

    def _interactive_waits_behind_batch(self) -> bool:
        """An interactive request heads the queue while batch-class requests join or run."""
        if not self._waiting or self._waiting[0][0].batch_class:
            return False
        return (any(j.prepared.batch_class for j in self._joining) or self._running is not None
                and any(r.prepared.batch_class for _, r in self._running.live()))

    def _preempt_for_interactive(self) -> None:
        """While an interactive request heads the queue and finds no room (rows or KV budget), batch-class requests
        make room: the newest joining one, else the newest running one (preempted, recomputed when it rejoins);
        either waits first in its class."""
        while self._interactive_waits_behind_batch():
            head = self._waiting[0][0]
            if head.prompt_tokens + head.sampling.max_new_tokens > self.max_batch_tokens:
                return  # too large even alone: it ends TooLargeForGPU, nobody makes room for it
            if self.active < self.max_batch_size and self._worst_case_kv(head) <= self.max_batch_tokens:
                return  # it fits
            joiners = [j for j in self._joining if j.prepared.batch_class]
            if joiners:  # not decoding yet: back to the queue costs at most a partial prefill (its tiles are cached)
                joiner = max(joiners, key=lambda j: j.row.admitted_at)
                self._joining.remove(joiner)
                self._waiting.appendleft((joiner.prepared, joiner.row.added_at))
                self._waiting = deque(sorted(self._waiting, key=lambda entry: entry[0].batch_class))
                continue
            assert self._running is not None
            index, _ = max(((i, r) for i, r in self._running.live() if r.prepared.batch_class),
                           key=lambda live: live[1].admitted_at)
            self._preempt(index, "interactive request waiting")

    def _defer_join(self, running: int) -> bool:
        """True while joins are gathered: rows decode, fewer than a quarter of the cap is free and more
        wait than that, for at most JOIN_DEFER_STEPS steps. Rows that leave one by one are then refilled
        in one vision call and one prefill forward instead of one each (measured: 11 -> 8 prefill
        forwards at 16 tokens, text, same steps and mean batch).

        When enough running rows reach their max_new_tokens within JOIN_WAVE_STEPS, the join waits for
        them instead (a wave of short jobs about to end: the early leavers' replacements join with theirs)."""
        if self._interactive_waits_behind_batch():
            self._deferred = 0
            return False  # it joins now: gathering is for throughput, not worth an interactive request's wait
        free = self.max_batch_size - self.active
        wanted = min(max(1, self.max_batch_size // 4), len(self._waiting))
        if not running or free >= wanted:
            self._deferred = 0
            return False
        limit = max(JOIN_DEFER_STEPS, self._steps_until_rows_leave(wanted - free))
        if self._deferred >= limit:
            self._deferred = 0
            return False
        self._deferred += 1
        return True

    def _steps_until_rows_leave(self, count: int) -> int:
        """Steps until `count` running rows have reached their max_new_tokens, if within JOIN_WAVE_STEPS; else 0."""
        assert self._running is not None
        left = sorted(row.prepared.sampling.max_new_tokens - len(row.generated) for _, row in self._running.live())
        if count > len(left) or left[count - 1] > JOIN_WAVE_STEPS:
            return 0
        return self._deferred + left[count - 1]
