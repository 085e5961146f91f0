"""ContinuousEngine on the tiny checkpoint: joining and leaving a running batch must not change answers.

The reference for "alone" is transformers' own `model.generate` on that one
request, so these tests also prove the engine's prefill-from-embeddings, its
left-padded cache and its per-row positions compute what `generate` does.
The tiny model's text is gibberish by design; the tests compare token ids.
Faults come from `FaultyModel`, a test-side wrapper around the real model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from model_runtime.engine_continuous import ContinuousEngine
from model_runtime.media import MediaLimits, decode_image, decode_video
from model_runtime.prompts import prepare, simple_chat
from model_runtime.samples import make_sample_image, make_sample_video
from model_runtime.types import (
    DeadlineExceeded, GenerationFailed, Output, Prepared, RequestCancelled, Sampling, TooLargeForGPU,
)

LIMITS = MediaLimits()
IMG, TALL, GRID, CLIP = "s3://m/a.jpg", "s3://m/b.png", "s3://m/grid.jpg", "s3://m/clip.mp4"


@pytest.fixture(scope="module")
def media(tiny_runtime):
    tile = int(tiny_runtime.processor.image_processor.size["height"])
    return {
        IMG: decode_image(make_sample_image(300, 200, seed=1), LIMITS),
        TALL: decode_image(make_sample_image(100, 400, seed=2, format="PNG"), LIMITS),
        GRID: decode_image(make_sample_image(4 * tile, 3 * tile, seed=3), LIMITS),  # 12 tiles + thumbnail
        CLIP: decode_video(make_sample_video(seconds=2, fps=10, width=96, height=64), LIMITS, num_frames=4),
    }


def prep(runtime, chat, media, sampling: Sampling, request_id: str) -> Prepared:
    return prepare(runtime.processor, chat, media, sampling, request_id=request_id,
                   context_length=runtime.loaded.context_length)


def mixed(runtime, media, lengths=(24, 5, 40, 17, 30, 9, 12)) -> list[Prepared]:
    chats = [
        simple_chat("Hello there, what is this?"),
        simple_chat("Describe.", images=[IMG]),
        simple_chat("Compare the two images and list every difference, please.", images=[IMG, TALL]),
        simple_chat("Summarise the video.", videos=[CLIP]),
        simple_chat("a"),
        simple_chat("Read every tile.", images=[GRID]),
        simple_chat("Describe.", images=[TALL]),
    ]
    return [prep(runtime, chat, media, Sampling(max_new_tokens=n), f"req-{i}")
            for i, (chat, n) in enumerate(zip(chats, lengths, strict=True))]


def solo_tokens(runtime, item: Prepared) -> list[int]:
    """What `model.generate` gives this request alone (greedy), EOS excluded."""
    tokenizer = runtime.processor.tokenizer
    inputs: dict[str, Any] = {"input_ids": item.input_ids[None],
                              "attention_mask": torch.ones_like(item.input_ids)[None]}
    if item.pixel_values is not None:
        inputs["pixel_values"] = item.pixel_values
    with torch.inference_mode():
        out = runtime.model.generate(**inputs, max_new_tokens=item.sampling.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    tokens = out[0, item.input_ids.shape[0]:].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens


def engine(runtime, model: Any = None, **kw) -> ContinuousEngine:
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_batch_tokens", 100_000)
    loaded = runtime.loaded if model is None else dataclasses.replace(runtime.loaded, model=model)
    return ContinuousEngine(loaded, **kw)


class FaultyModel:
    """The real model, except that calls for which `fails(kind, kwargs)` is true raise `error`.

    kind is "forward" (decode steps and prefill chunks) or "vision".
    """

    def __init__(self, model: Any, fails: Callable[[str, dict], bool], error: Callable[[], BaseException]):
        self.model, self.fails, self.error, self.raised = model, fails, error, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        self._maybe_fail("forward", kwargs)
        return self.model(**kwargs)

    def get_image_features(self, **kwargs: Any) -> Any:
        self._maybe_fail("vision", kwargs)
        return self.model.get_image_features(**kwargs)

    def _maybe_fail(self, kind: str, kwargs: dict) -> None:
        if self.fails(kind, kwargs):
            self.raised += 1
            raise self.error()


def oom() -> BaseException:
    return torch.cuda.OutOfMemoryError("FaultyModel: out of memory")


def decode_rows(kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    return int(ids.shape[0]) if ids is not None else 0


# ---------------------------------------------------------------- equality


@pytest.mark.parametrize("chunk", [512, 7], ids=["whole-prefill", "chunked-prefill"])
def test_every_request_gets_its_solo_tokens_beside_videos_and_12_tile_images(tiny_runtime, media, chunk):
    items = mixed(tiny_runtime, media)
    assert max(p.tiles for p in items) >= 12 and any(p.video_frames for p in items)
    alone = [solo_tokens(tiny_runtime, p) for p in items]
    eng = engine(tiny_runtime, prefill_chunk_tokens=chunk, vision_chunk_tiles=5)
    outs = eng.run_until_done(items)
    for item, out, ref in zip(items, outs, alone, strict=True):
        assert isinstance(out, Output), out
        assert out.request_id == item.request_id
        assert out.token_ids == ref
        assert out.padding_tokens == 0 and out.prompt_tokens == item.prompt_tokens
    assert len({tuple(r) for r in alone}) == len(items)  # the model reacts to its input: not a vacuous check
    assert eng.stats.mean_decode_batch > 1.5  # they really shared decode steps
    assert max(out.batch_size for out in outs) >= 4


def test_a_request_joining_mid_flight_and_one_leaving_early_keep_their_tokens(tiny_runtime, media):
    long = prep(tiny_runtime, simple_chat("Describe.", images=[IMG]), media, Sampling(max_new_tokens=40), "long")
    early = prep(tiny_runtime, simple_chat("a"), media, Sampling(max_new_tokens=3), "early")
    late = prep(tiny_runtime, simple_chat("Summarise the video.", videos=[CLIP]), media,
                Sampling(max_new_tokens=20), "late")
    eng = engine(tiny_runtime)
    eng.add(long)
    eng.add(early)
    done: dict[str, tuple[int, Any]] = {}
    step = 0
    while len(done) < 3:
        step += 1
        if step == 6:
            eng.add(late)  # joins while "long" is decoding
        for prepared, result in eng.step():
            done[prepared.request_id] = (step, result)
    assert done["early"][0] < 6 < done["long"][0]  # left before the others, who went on
    assert done["late"][1].batch_size == 2  # decoded beside "long"
    for item in (long, early, late):
        assert done[item.request_id][1].token_ids == solo_tokens(tiny_runtime, item)
    assert len(done["early"][1].token_ids) <= 3


def test_rows_that_leave_together_are_refilled_in_one_step_and_keep_their_solo_tokens(tiny_runtime, media):
    """The prefill budget is per joining request: two rows leaving at once are both replaced at the next
    step, in one padded forward, though one chunk holds only one of their prompts."""
    def job(i: int, tokens: int) -> Prepared:
        return prep(tiny_runtime, simple_chat(f"Describe picture {i}, please.", images=[IMG]), media,
                    Sampling(max_new_tokens=tokens, min_new_tokens=tokens), f"job-{i}")

    items = [job(0, 24), job(1, 24)] + [job(i, 4) for i in range(2, 8)]
    prompt = items[0].prompt_tokens
    assert {p.prompt_tokens for p in items} == {prompt}
    eng = engine(tiny_runtime, max_batch_size=4, prefill_chunk_tokens=prompt + 4, vision_chunk_tiles=items[0].tiles)
    for item in items:
        eng.add(item)
    outs: dict[str, Any] = {}
    forwards = []
    while eng.has_work():
        before = eng.stats.prefill_chunks
        outs.update((p.request_id, r) for p, r in eng.step())
        forwards.append(eng.stats.prefill_chunks - before)
    # The first four, then two pairs, each pair in one forward (one chunk a step took two steps a pair).
    assert forwards.count(1) == 3 and sum(forwards) == 3
    assert all(outs[p.request_id].batch_size == 4 for p in items)  # every job decoded in a full batch
    assert [outs[p.request_id].token_ids for p in items] == [solo_tokens(tiny_runtime, p) for p in items]


def test_a_seeded_sampled_request_gives_the_same_text_alone_and_in_any_batch(tiny_runtime, media):
    sampled = Sampling(max_new_tokens=24, do_sample=True, temperature=1.3, top_p=0.9, top_k=50, seed=7)
    def item(request_id: str, sampling: Sampling = sampled) -> Prepared:
        return prep(tiny_runtime, simple_chat("Describe.", images=[IMG]), media, sampling, request_id)

    alone = engine(tiny_runtime).run_until_done([item("alone")])[0]
    neighbours = mixed(tiny_runtime, media)
    other_sampled = dataclasses.replace(sampled, seed=8, temperature=0.7, repetition_penalty=1.3)
    in_batch = engine(tiny_runtime).run_until_done(neighbours[:3] + [item("batched"), item("other", other_sampled)])
    in_other_batch = engine(tiny_runtime).run_until_done([item("again")] + neighbours[3:])
    assert in_batch[3].token_ids == alone.token_ids == in_other_batch[0].token_ids
    assert in_batch[4].token_ids != alone.token_ids  # another seed and settings: another draw
    greedy = neighbours[:3]
    assert [o.token_ids for o in in_batch[:3]] == [solo_tokens(tiny_runtime, p) for p in greedy]


def test_a_stop_string_ends_the_output_before_it(tiny_runtime, media):
    base = prep(tiny_runtime, simple_chat("Describe."), media, Sampling(max_new_tokens=30), "base")
    full = engine(tiny_runtime).run_until_done([base])[0]
    assert len(full.text) > 8
    stop = full.text[5:8]
    cut = prep(tiny_runtime, simple_chat("Describe."), media, Sampling(max_new_tokens=30, stop=(stop,)), "cut")
    out = engine(tiny_runtime).run_until_done([cut])[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert out.completion_tokens < full.completion_tokens


# ---------------------------------------------------------------- leaving for other reasons


def test_a_cancelled_request_leaves_within_one_step_and_its_neighbours_are_unchanged(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(40,) * 7)
    cancelled = {"flag": False}
    victim = dataclasses.replace(items[1], cancelled=lambda: cancelled["flag"])
    eng = engine(tiny_runtime)
    for item in [victim, *items[2:4]]:
        eng.add(item)
    results: dict[str, Any] = {}
    for _ in range(8):
        results.update((p.request_id, r) for p, r in eng.step())
    assert not results  # all still decoding
    cancelled["flag"] = True
    results.update((p.request_id, r) for p, r in eng.step())
    assert isinstance(results.pop(victim.request_id), RequestCancelled)  # the very next step
    while eng.has_work():
        results.update((p.request_id, r) for p, r in eng.step())
    for item in items[2:4]:
        assert results[item.request_id].token_ids == solo_tokens(tiny_runtime, item)


def test_a_request_past_its_deadline_ends_with_deadline_exceeded(tiny_runtime, media):
    import time

    items = mixed(tiny_runtime, media, lengths=(30,) * 7)[:2]
    late = dataclasses.replace(items[0], deadline=time.monotonic() - 1)
    out = engine(tiny_runtime).run_until_done([late, items[1]])
    assert isinstance(out[0], DeadlineExceeded)
    assert out[1].token_ids == solo_tokens(tiny_runtime, items[1])


# ---------------------------------------------------------------- failures stay per request


def test_oom_mid_decode_preempts_the_newest_and_recomputes_it(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(20,) * 7)[:5]
    faulty = FaultyModel(tiny_runtime.model, lambda kind, kw: kind == "forward" and decode_rows(kw) > 3, oom)
    eng = engine(tiny_runtime, faulty)
    outs = eng.run_until_done(items)
    assert faulty.raised >= 1 and eng.stats.preempted >= 1
    assert [o.token_ids for o in outs] == [solo_tokens(tiny_runtime, p) for p in items]
    assert max(o.batch_size for o in outs) <= 3


def test_oom_while_joining_makes_the_joiner_wait_for_room(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(12, 6, 10, 8, 9, 7, 11))
    eng_holder: dict[str, ContinuousEngine] = {}
    # A prefill (inputs_embeds) fails while two or more other requests are running or joining.
    faulty = FaultyModel(tiny_runtime.model,
                         lambda kind, kw: kind == "forward" and "inputs_embeds" in kw and eng_holder["e"].active > 3,
                         oom)
    eng = eng_holder["e"] = engine(tiny_runtime, faulty)
    outs = eng.run_until_done(items)
    assert faulty.raised >= 1 and eng.stats.join_ooms >= 1
    assert [o.token_ids for o in outs] == [solo_tokens(tiny_runtime, p) for p in items]


def biggest_and_next(items: list[Prepared]) -> tuple[int, int]:
    """Index of the longest prompt, and the length of the second longest."""
    order = sorted(range(len(items)), key=lambda i: items[i].prompt_tokens)
    assert items[order[-1]].prompt_tokens > items[order[-2]].prompt_tokens
    return order[-1], items[order[-2]].prompt_tokens


def test_a_request_that_cannot_fit_alone_ends_too_large_and_the_others_succeed(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(10,) * 7)
    big, next_longest = biggest_and_next(items)
    faulty = FaultyModel(tiny_runtime.model,
                         lambda kind, kw: kind == "forward" and kw.get("inputs_embeds") is not None
                         and kw["inputs_embeds"].shape[1] > next_longest, oom)
    outs = engine(tiny_runtime, faulty).run_until_done(items)
    assert isinstance(outs[big], TooLargeForGPU) and outs[big].code == "too_large_for_gpu"
    for i, (item, out) in enumerate(zip(items, outs, strict=True)):
        if i != big:
            assert out.token_ids == solo_tokens(tiny_runtime, item)


def test_a_lone_joiner_out_of_memory_beside_rows_not_yet_merged_still_ends(tiny_runtime, media):
    # One step prefills two short prompts as one padded group (their rows wait to merge at the step's
    # end; none decode yet), then the long one alone runs out of memory. It must wait for the short
    # ones to leave, then try alone and end too_large_for_gpu; it once waited, forever, for fewer
    # than 0 running rows.
    from model_runtime.prefill import similar_length_groups

    shorts = [prep(tiny_runtime, simple_chat(text), media, Sampling(max_new_tokens=3), f"short-{text}")
              for text in ("a", "b")]
    long = prep(tiny_runtime, simple_chat("Read every word: " + "tile " * 300), media, Sampling(max_new_tokens=3),
                "long")
    limit = max(p.prompt_tokens for p in shorts)
    assert similar_length_groups([p.prompt_tokens for p in (*shorts, long)]) == [[0, 1], [2]]
    faulty = FaultyModel(tiny_runtime.model,
                         lambda kind, kw: kind == "forward" and kw.get("inputs_embeds") is not None
                         and kw["inputs_embeds"].shape[1] > limit, oom)
    eng = engine(tiny_runtime, faulty)
    for item in (*shorts, long):
        eng.add(item)
    ended: dict[str, Any] = {}
    for _ in range(100):  # bounded: the bug was a loop that never admitted it again
        ended.update((p.request_id, out) for p, out in eng.step())
        if len(ended) == 3:
            break
    assert isinstance(ended.get("long"), TooLargeForGPU)
    for item in shorts:
        assert isinstance(ended.get(item.request_id), Output)
        assert ended[item.request_id].token_ids == solo_tokens(tiny_runtime, item)


def test_an_early_leavers_replacement_waits_for_the_wave_about_to_end(tiny_runtime, media):
    # Eight rows pinned at 8 tokens; one is cancelled early. The two that arrive then wait while the
    # other seven finish (they all end within JOIN_WAVE_STEPS), and join together in one prefill,
    # instead of one alone after JOIN_DEFER_STEPS (a vision call and a prefill each, at fixed lengths).
    pin = Sampling(max_new_tokens=8, min_new_tokens=8)
    wave = [prep(tiny_runtime, simple_chat(f"row {i}"), media, pin, f"row-{i}") for i in range(8)]
    eng = engine(tiny_runtime)  # cap 8: a join is wanted for 2 free rows
    for item in wave:
        eng.add(item)
    eng.step()
    assert eng._running is not None and len(eng._running) == 8
    wave[0].cancelled = lambda: True
    late = [prep(tiny_runtime, simple_chat(f"late {i}"), media, Sampling(max_new_tokens=4), f"late-{i}")
            for i in range(2)]
    for item in late:
        eng.add(item)
    ended: dict[str, Any] = {}
    wave_steps = 0
    while eng._running is not None and any(row.request_id.startswith("row-") for _, row in eng._running.live()):
        assert len(eng._waiting) == 2, f"a late request joined after {wave_steps} steps, before the wave ended"
        ended.update((p.request_id, out) for p, out in eng.step())
        wave_steps += 1
        assert wave_steps < 20
    assert wave_steps > 4  # longer than JOIN_DEFER_STEPS alone would have held them
    forwards = eng.stats.prefill_chunks
    ended.update((p.request_id, out) for p, out in eng.step())  # the wave has left: both join now
    assert eng.stats.prefill_chunks - forwards == 1 and not eng._waiting  # both in one prefill
    while eng.has_work():
        ended.update((p.request_id, out) for p, out in eng.step())
    assert isinstance(ended["row-0"], RequestCancelled)
    assert all(ended[item.request_id].completion_tokens == 8 for item in wave[1:])
    for item in late:
        assert ended[item.request_id].token_ids == solo_tokens(tiny_runtime, item)


def test_a_request_over_the_kv_budget_is_refused_before_it_touches_the_model(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(10,) * 7)
    big, next_longest = biggest_and_next(items)
    outs = engine(tiny_runtime, max_batch_tokens=next_longest + 10).run_until_done(items)
    assert isinstance(outs[big], TooLargeForGPU) and "KV budget" in str(outs[big])
    assert all(isinstance(o, Output) for i, o in enumerate(outs) if i != big)


def test_the_kv_budget_bounds_the_running_batch(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(10,) * 7)
    longest = max(p.prompt_tokens + 10 for p in items)
    outs = engine(tiny_runtime, max_batch_tokens=2 * longest).run_until_done(items)
    assert all(isinstance(o, Output) for o in outs)
    assert max(o.batch_size for o in outs) == 2


def test_an_exception_in_the_vision_tower_fails_only_the_request_it_touched(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(10,) * 7)
    bad, neighbours = items[5], [items[1], items[3], items[0]]  # the 12-tile image; an image, a video, text
    poisoned = bad.pixel_values[0].to(tiny_runtime.model.dtype)

    def touches_bad(kind: str, kw: dict) -> bool:
        return kind == "vision" and any(torch.equal(tile, poisoned) for tile in kw["pixel_values"])

    faulty = FaultyModel(tiny_runtime.model, touches_bad, lambda: RuntimeError("bad tile"))
    eng = engine(tiny_runtime, faulty, vision_chunk_tiles=64)  # all of them in one vision call
    outs = eng.run_until_done([bad, *neighbours])
    assert faulty.raised == 2  # the shared call, then the bad request alone
    assert isinstance(outs[0], GenerationFailed)
    assert [o.token_ids for o in outs[1:]] == [solo_tokens(tiny_runtime, p) for p in neighbours]


def test_an_exception_mid_decode_fails_the_rows_it_touched_and_the_engine_goes_on(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(10,) * 7)
    armed = {"on": True}

    def fails(kind: str, kw: dict) -> bool:
        if kind == "forward" and decode_rows(kw) == 2 and armed["on"]:
            armed["on"] = False
            return True
        return False

    eng = engine(tiny_runtime, FaultyModel(tiny_runtime.model, fails, lambda: RuntimeError("kernel failed")))
    first = eng.run_until_done(items[:2])
    assert all(isinstance(o, GenerationFailed) for o in first)
    again = eng.run_until_done(items[2:4])
    assert [o.token_ids for o in again] == [solo_tokens(tiny_runtime, p) for p in items[2:4]]


def test_min_new_tokens_holds_eos_back_in_both_engines(tiny_runtime, media):
    items = mixed(tiny_runtime, media, lengths=(40,) * 7)
    free = engine(tiny_runtime).run_until_done(items)
    stopped = next(i for i, o in enumerate(free) if o.finish_reason == "stop")  # the random model stops early
    pinned = dataclasses.replace(items[stopped], sampling=Sampling(max_new_tokens=40, min_new_tokens=40))
    for out in (engine(tiny_runtime).run_until_done([pinned])[0], tiny_runtime.engine.generate_batch([pinned])[0]):
        assert out.completion_tokens == 40 and out.finish_reason == "length"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prompts_prefilled_together_give_solo_tokens_with_sdpa_and_eager(tiny_runtime, tiny_model_dir, tmp_path, media,
                                                                        attention):
    from model_runtime.loading import load_runtime
    from model_runtime.prefill import similar_length_groups

    loaded = load_runtime(str(tiny_model_dir), cache_dir=tmp_path, device="cpu", attn_implementation=attention)
    assert loaded.attn_implementation == attention
    alike = [prep(tiny_runtime, simple_chat(f"Describe picture {i}, please" + " now" * (i % 3), images=[IMG]), media,
                  Sampling(max_new_tokens=12), f"alike-{i}") for i in range(4)]
    items = mixed(tiny_runtime, media) + alike
    groups = similar_length_groups([p.prompt_tokens for p in items])
    assert any(len(group) >= 4 for group in groups) and len(groups) < len(items)
    eng = ContinuousEngine(loaded, max_batch_size=16, max_batch_tokens=100_000, prefill_chunk_tokens=4096,
                           vision_chunk_tiles=64)
    outs = eng.run_until_done(items)
    assert eng.stats.prefill_chunks == len(groups)  # one forward per group of similar lengths, all in one step
    assert [o.token_ids for o in outs] == [solo_tokens(tiny_runtime, p) for p in items]
