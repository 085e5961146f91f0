"""The continuous engine's progress hook on the tiny checkpoint, and settled text with its real tokenizer.

The hook's clock is a fake one that the engine steps (one tick a step), so
"at most every interval" is counted, not timed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from model_runtime.text import cut_at_stop, decode_text, settled_text
from model_runtime.types import Output, Prepared, Sampling
from tests.integration.test_engine_continuous import FaultyModel, decode_rows, engine, mixed, oom, solo_tokens
from tests.integration.test_engine_continuous import media as media  # the `media` fixture, shared

TICK = 0.1


class StepClock:
    """Advances TICK each time the engine reads it (once a step)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now = round(self.now + TICK, 6)
        return self.now


class Recorder:
    """One hook per request: (clock time, ids) of each call."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.calls: dict[str, list[tuple[float, tuple[int, ...]]]] = {}

    def attach(self, item: Prepared) -> Prepared:
        calls = self.calls.setdefault(item.request_id, [])

        def hook(ids: Sequence[int]) -> None:
            assert isinstance(ids, tuple)  # a copy of its own, not the engine's list
            calls.append((self.clock.now, ids))

        return dataclasses.replace(item, on_progress=hook)


def run_steps(eng: Any, items: list[Prepared], recorder: Recorder) -> dict[str, tuple[Any, int]]:
    """Step until all end: each request's result and how many hook calls it had when it ended."""
    for item in items:
        eng.add(item)
    done: dict[str, tuple[Any, int]] = {}
    while eng.has_work():
        for prepared, result in eng.step():
            done[prepared.request_id] = (result, len(recorder.calls.get(prepared.request_id, [])))
    return done


def test_the_hook_gets_prefixes_of_the_final_ids_at_most_every_interval_and_never_after_the_end(
        tiny_runtime, media):
    clock = StepClock()
    recorder = Recorder(clock)
    items = [recorder.attach(p) for p in mixed(tiny_runtime, media, lengths=(40, 5, 30, 17, 24, 9, 12))]
    eng = engine(tiny_runtime, progress_interval_s=0.25, clock=clock)
    done = run_steps(eng, items, recorder)
    for item in items:
        out, calls_at_end = done[item.request_id]
        calls = recorder.calls[item.request_id]
        assert isinstance(out, Output)
        assert out.token_ids == solo_tokens(tiny_runtime, item)  # the hook changes nothing
        assert len(calls) == calls_at_end  # none after it ended
        times = [t for t, _ in calls]
        assert all(b - a >= 0.25 for a, b in zip(times, times[1:], strict=False))
        lengths = [len(ids) for _, ids in calls]
        assert lengths == sorted(set(lengths))  # growing
        for _, ids in calls:
            assert 1 <= len(ids) <= len(out.token_ids) and list(ids) == out.token_ids[: len(ids)]
    longest = max(items, key=lambda p: len(done[p.request_id][0].token_ids))
    assert len(recorder.calls[longest.request_id]) >= 5  # one per 3 steps: the hook really ran


def test_a_hook_that_raises_is_dropped_and_its_request_and_neighbours_are_unchanged(tiny_runtime, media):
    clock = StepClock()
    recorder = Recorder(clock)
    items = [mixed(tiny_runtime, media, lengths=(30,) * 7)[i] for i in (1, 2, 4)]  # all run to 30 tokens
    raised: list[int] = []

    def broken(ids: Sequence[int]) -> None:
        raised.append(len(ids))
        raise RuntimeError("hook broke")

    victim = dataclasses.replace(items[0], on_progress=broken)
    others = [recorder.attach(p) for p in items[1:]]
    done = run_steps(engine(tiny_runtime, progress_interval_s=0.0, clock=clock), [victim, *others], recorder)
    assert len(raised) == 1  # logged once, never called again
    for item in (victim, *others):
        assert done[item.request_id][0].token_ids == solo_tokens(tiny_runtime, item)
    assert all(len(recorder.calls[p.request_id]) >= 10 for p in others)  # interval 0: every step


def test_a_preempted_unseeded_sampled_request_recomputes_what_its_progress_showed(tiny_runtime, media):
    clock = StepClock()
    recorder = Recorder(clock)
    sampled = Sampling(max_new_tokens=24, do_sample=True, temperature=1.5, top_k=100)  # no seed
    items = [recorder.attach(dataclasses.replace(p, sampling=sampled))
             for p in mixed(tiny_runtime, media, lengths=(24,) * 7)[:4]]
    faulty = FaultyModel(tiny_runtime.model, lambda kind, kw: kind == "forward" and decode_rows(kw) > 2, oom)
    eng = engine(tiny_runtime, faulty, progress_interval_s=0.0, clock=clock)
    done = run_steps(eng, items, recorder)
    assert eng.stats.preempted >= 1
    for item in items:
        out = done[item.request_id][0]
        assert isinstance(out, Output)
        for _, ids in recorder.calls[item.request_id]:
            assert list(ids) == out.token_ids[: len(ids)]


def test_the_static_engine_never_calls_the_hook(tiny_runtime, media):
    calls: list[Sequence[int]] = []
    item = dataclasses.replace(mixed(tiny_runtime, media, lengths=(20,) * 7)[0], on_progress=calls.append)
    assert isinstance(tiny_runtime.engine.generate_batch([item])[0], Output)
    assert calls == []


def test_settled_text_of_every_prefix_starts_the_final_text_with_the_real_tokenizer(tiny_runtime):
    tokenizer = tiny_runtime.processor.tokenizer
    rng = random.Random(3)
    vocab = len(tokenizer)
    before = tokenizer.clean_up_tokenization_spaces
    try:
        for cleanup in (False, True):
            tokenizer.clean_up_tokenization_spaces = cleanup
            for _ in range(150):
                ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
                full = decode_text(tokenizer, ids)
                stops = (full[len(full) // 2: len(full) // 2 + 2],) if len(full) > 4 and rng.random() < 0.5 else ()
                final = cut_at_stop(full, stops)
                final = full if final is None else final
                for k in range(len(ids) + 1):
                    shown = settled_text(tokenizer, ids[:k], stops)
                    assert final.startswith(shown), (ids, k, stops, shown, final)
    finally:
        tokenizer.clean_up_tokenization_spaces = before

