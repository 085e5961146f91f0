"""Engine.generate_batch on the tiny checkpoint: batching must not change answers.

Greedy decoding of a left-padded mixed batch gives each request exactly the
tokens it gets alone. The out-of-memory path is driven by tests/oom.py's
`OomAbove` wrapper around the model, which raises the real
torch.cuda.OutOfMemoryError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model_runtime.engine import Engine
from model_runtime.loading import load_runtime
from model_runtime.media import MediaLimits, decode_image, decode_video
from model_runtime.prompts import prepare, simple_chat
from model_runtime.samples import make_sample_image, make_sample_video
from model_runtime.tiny import build_tiny, ensure_tiny
from model_runtime.types import (
    DeadlineExceeded, GenerationFailed, Output, RequestCancelled, Sampling, TooLargeForGPU,
)
from tests.oom import OomAbove

LIMITS = MediaLimits()
IMG_A, IMG_B, CLIP = "s3://m/a.jpg", "s3://m/b.png", "s3://m/clip.mp4"
GREEDY = Sampling(max_new_tokens=24)
PROMPTS = ["Hello there, what is this?", "Describe.", "a", "Is there a cat?", "Read the text",
           "What happens first?", "one two three four five six", "The quick brown fox"]


@pytest.fixture(scope="module")
def media():
    return {
        IMG_A: decode_image(make_sample_image(300, 200, seed=1), LIMITS),
        IMG_B: decode_image(make_sample_image(100, 400, seed=2, format="PNG"), LIMITS),
        CLIP: decode_video(make_sample_video(seconds=2, fps=10, width=96, height=64), LIMITS, num_frames=4),
    }


def _prep(runtime, chat, media, request_id="r", sampling=GREEDY):
    return prepare(runtime.processor, chat, media, sampling, request_id=request_id,
                   context_length=runtime.loaded.context_length)


def _oom_engine(runtime, max_tokens: int, **kw) -> Engine:
    """An engine whose model runs out of memory on inputs over `max_tokens` (batch × sequence)."""
    loaded = dataclasses.replace(runtime.loaded, model=OomAbove(runtime.loaded.model, max_tokens))
    return Engine(loaded, **kw)


def _mixed(runtime, media, sampling=GREEDY):
    chats = [
        simple_chat("Hello there, what is this?"),
        simple_chat("Describe.", images=[IMG_A]),
        simple_chat("Compare the two images and list every difference, please.", images=[IMG_A, IMG_B]),
        simple_chat("Summarise the video.", videos=[CLIP]),
        simple_chat("a"),
        simple_chat("Describe.", images=[IMG_B]),
    ]
    return [_prep(runtime, c, media, f"req-{i}", sampling) for i, c in enumerate(chats)]


def test_mixed_batch_gives_each_request_its_solo_tokens(tiny_runtime, media):
    engine = tiny_runtime.engine
    items = _mixed(tiny_runtime, media)
    assert len({p.prompt_tokens for p in items}) == len(items)  # all lengths differ: real padding
    batched = engine.generate_batch(items)
    alone = [engine.generate_batch([p])[0] for p in items]
    for item, b, a in zip(items, batched, alone, strict=True):
        assert isinstance(b, Output) and isinstance(a, Output)
        assert b.request_id == item.request_id
        assert (b.text, b.completion_tokens, b.finish_reason) == (a.text, a.completion_tokens, a.finish_reason)
        assert b.batch_size == len(items) and a.batch_size == 1
        assert b.padding_tokens == max(p.prompt_tokens for p in items) - item.prompt_tokens
        assert a.padding_tokens == 0 and b.prompt_tokens == item.prompt_tokens
    assert len({b.text for b in batched}) == len(items)  # the model reacts to its input: not a vacuous check


def test_media_changes_the_answer(tiny_runtime, media):
    a, b = (_prep(tiny_runtime, simple_chat("Describe.", images=[u]), media) for u in (IMG_A, IMG_B))
    out_a, out_b = tiny_runtime.engine.generate_batch([a, b])
    assert out_a.text != out_b.text


def test_groups_by_sampling_and_keeps_order(tiny_runtime, media):
    engine = tiny_runtime.engine
    short, long = Sampling(max_new_tokens=3), Sampling(max_new_tokens=9)
    params = [short, long, short, long, long]
    items = [_prep(tiny_runtime, simple_chat(PROMPTS[i]), media, f"g{i}", g) for i, g in enumerate(params)]
    before = engine.stats.batches
    results = engine.generate_batch(items)
    assert engine.stats.batches - before == 2  # one generate per group
    assert [r.request_id for r in results] == [p.request_id for p in items]
    assert [r.batch_size for r in results] == [2, 3, 2, 3, 3]
    for r, g in zip(results, params, strict=True):
        assert 1 <= r.completion_tokens <= g.max_new_tokens


def test_never_generates_more_rows_than_max_batch_size(tiny_runtime, media):
    engine = Engine(tiny_runtime.loaded, max_batch_size=2)
    items = [_prep(tiny_runtime, simple_chat(p), media, p, Sampling(max_new_tokens=2)) for p in PROMPTS[:5]]
    results = engine.generate_batch(items)
    assert [r.batch_size for r in results] == [2, 2, 2, 2, 1]
    assert [r.request_id for r in results] == PROMPTS[:5] and engine.stats.batches == 3


def test_finish_reason_stop_and_length(tiny_runtime, media):
    eos = tiny_runtime.processor.tokenizer.eos_token_id
    items = [_prep(tiny_runtime, simple_chat(p), media, p) for p in PROMPTS]
    results = tiny_runtime.engine.generate_batch(items)
    stopped = [r for r in results if r.finish_reason == "stop"]
    ran_out = [r for r in results if r.finish_reason == "length"]
    assert stopped and ran_out  # the tiny model's louder end-of-turn token makes both happen
    for r in ran_out:
        assert r.completion_tokens == GREEDY.max_new_tokens == len(r.token_ids)
    for r in stopped:
        assert r.completion_tokens < GREEDY.max_new_tokens
        # Regenerate alone, exactly as many tokens as counted: the last one is the stop token.
        item = next(i for i in items if i.request_id == r.request_id)
        ids = tiny_runtime.model.generate(input_ids=item.input_ids[None], max_new_tokens=r.completion_tokens,
                                          do_sample=False)[0, item.prompt_tokens:]
        assert ids[-1].item() == eos and eos not in ids[:-1].tolist()
        assert r.token_ids == ids[:-1].tolist()  # the stop token is not among them
        assert tiny_runtime.processor.tokenizer.decode(ids[:-1], skip_special_tokens=True) == r.text


def _alone(runtime, prompt, media) -> Output:
    return runtime.engine.generate_batch([_prep(runtime, simple_chat(prompt), media, prompt)])[0]


def test_stop_string_ends_the_output_before_it(tiny_runtime, media):
    tokenizer = tiny_runtime.processor.tokenizer
    prompt = max(PROMPTS, key=lambda p: len(_alone(tiny_runtime, p, media).text))  # the tiny model's longest answer
    alone = _alone(tiny_runtime, prompt, media)
    text = alone.text
    # A plain three-letter piece near the middle that does not occur earlier (the tiny model's text is gibberish).
    starts = [i for i in range(1, len(text) - 3)
              if text[i : i + 3].isascii() and text[i : i + 3].isalnum() and text.index(text[i : i + 3]) == i]
    cut = min(starts, key=lambda i: abs(i - len(text) // 2))
    stop = text[cut : cut + 3]
    sampling = dataclasses.replace(GREEDY, stop=("never-in-this-text", stop))
    (out,) = tiny_runtime.engine.generate_batch([_prep(tiny_runtime, simple_chat(prompt), media, "s", sampling)])
    assert (out.text, out.finish_reason) == (text[:cut], "stop")
    assert text.startswith(tokenizer.decode(out.token_ids, skip_special_tokens=True))
    assert len(out.token_ids) < out.completion_tokens <= alone.completion_tokens
    assert out.token_ids == alone.token_ids[: len(out.token_ids)]


def test_cancelled_or_expired_requests_do_not_run(tiny_runtime, media):
    ok, cancelled, expired = (_prep(tiny_runtime, simple_chat(p), media, p, Sampling(max_new_tokens=2))
                              for p in PROMPTS[:3])
    cancelled.cancelled = lambda: True
    expired.deadline = time.monotonic() - 1
    results = tiny_runtime.engine.generate_batch([cancelled, ok, expired])
    assert isinstance(results[0], RequestCancelled) and isinstance(results[2], DeadlineExceeded)
    assert isinstance(results[1], Output) and results[1].batch_size == 1


def test_seeded_sampling_is_reproducible(tiny_runtime, media):
    def run(seed):
        sampling = Sampling(max_new_tokens=16, do_sample=True, temperature=1.0, seed=seed)
        items = [_prep(tiny_runtime, simple_chat(p), media, sampling=sampling) for p in PROMPTS[:3]]
        return [r.text for r in tiny_runtime.engine.generate_batch(items)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_oom_halves_the_batch_until_it_fits(tiny_runtime, media):
    items = [_prep(tiny_runtime, simple_chat(p), media, p) for p in PROMPTS[:4]]
    longest = max(p.prompt_tokens for p in items)
    reference = tiny_runtime.engine.generate_batch(items)
    engine = _oom_engine(tiny_runtime, 2 * longest, max_batch_size=8)
    results = engine.generate_batch(items)
    assert all(isinstance(r, Output) for r in results)
    assert [r.text for r in results] == [r.text for r in reference]
    assert [r.batch_size for r in results] == [2, 2, 2, 2]
    assert engine.stats.oom_splits == 1 and engine.stats.batches == 2 and engine.model.raised == 1


def test_request_too_large_alone_fails_only_itself(tiny_runtime, media):
    short = [_prep(tiny_runtime, simple_chat(p), media, p) for p in PROMPTS[:3]]
    big = _prep(tiny_runtime, simple_chat("Compare.", images=[IMG_A, IMG_B]), media, "big")
    assert 2 * max(p.prompt_tokens for p in short) < big.prompt_tokens  # pairs of short ones still fit
    engine = _oom_engine(tiny_runtime, big.prompt_tokens - 1, max_batch_size=8)
    results = engine.generate_batch([short[0], big, short[1], short[2]])
    assert isinstance(results[1], TooLargeForGPU) and results[1].code == "too_large_for_gpu"
    assert [r.request_id for r in (results[0], results[2], results[3])] == [p.request_id for p in short]
    assert all(isinstance(r, Output) for r in (results[0], results[2], results[3]))


def test_other_generate_errors_fail_only_their_group(tiny_runtime, media):
    image = _prep(tiny_runtime, simple_chat("Describe.", images=[IMG_A]), media, "broken")
    # One tile fewer than its image tokens: the model refuses the mismatch.
    broken = dataclasses.replace(image, pixel_values=image.pixel_values[:-1])
    other = _prep(tiny_runtime, simple_chat("Hi"), media, "ok", Sampling(max_new_tokens=5))
    results = tiny_runtime.engine.generate_batch([broken, other])
    assert isinstance(results[0], GenerationFailed)
    assert isinstance(results[1], Output) and results[1].request_id == "ok"


def test_stats_count_padding(tiny_runtime, media):
    engine = Engine(tiny_runtime.loaded, max_batch_size=8)
    items = _mixed(tiny_runtime, media, Sampling(max_new_tokens=2))
    results = engine.generate_batch(items)
    longest = max(p.prompt_tokens for p in items)
    assert engine.stats.total_tokens == longest * len(items)
    assert engine.stats.padded_tokens == sum(longest - p.prompt_tokens for p in items)
    assert engine.stats.padded_tokens == sum(r.padding_tokens for r in results)
    assert engine.stats.items == len(items) and engine.stats.generate_seconds > 0


def test_warmup_runs_the_largest_batch_and_fails_fast(tiny_runtime):
    engine = Engine(tiny_runtime.loaded, max_batch_size=4)
    assert engine.warmup(4, max_new_tokens=2) > 0
    assert engine.stats.batches == 1 and engine.stats.items == 4
    too_small = _oom_engine(tiny_runtime, 100, max_batch_size=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        too_small.warmup(4, max_new_tokens=2)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_build_is_deterministic_and_cached(tmp_path, tiny_model_dir):
    again = build_tiny(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(tiny_model_dir / name)
    cached = ensure_tiny(tmp_path / "cache")
    assert ensure_tiny(tmp_path / "cache") == cached
    assert _digest(cached / "model.safetensors") == _digest(tiny_model_dir / "model.safetensors")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build")]


def test_concurrent_builders_get_one_checkpoint(tmp_path):
    # Threads race exactly like processes here: each builds in its own scratch dir, then renames.
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = set(pool.map(lambda _: ensure_tiny(tmp_path), range(3)))
    assert paths == {tmp_path / "internvl-tiny-random"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["internvl-tiny-random"]  # no scratch dirs left
    assert (tmp_path / "internvl-tiny-random" / "model.safetensors").is_file()


def test_load_runtime_choices(tmp_path, tiny_model_dir):
    eager = load_runtime(str(tiny_model_dir), cache_dir=tmp_path, attn_implementation="eager")
    assert eager.attn_implementation == "eager" and eager.model.config._attn_implementation == "eager"
    named = load_runtime("tiny", cache_dir=tmp_path)
    assert (tmp_path / "internvl-tiny-random" / "config.json").is_file() and named.model_id == "tiny"
    with pytest.raises(RuntimeError, match="CUDA"):
        load_runtime(str(tiny_model_dir), cache_dir=tmp_path, quantization="4bit", device="cpu")
    with pytest.raises(ValueError):
        load_runtime(str(tiny_model_dir), cache_dir=tmp_path, dtype="float8")


def test_small_variant_has_224px_tiles_of_64_tokens(tmp_path, media):
    loaded = load_runtime(str(build_tiny(tmp_path / "small", size="small")), cache_dir=tmp_path)
    item = prepare(loaded.processor, simple_chat("Describe.", images=[IMG_A]), media, Sampling(max_new_tokens=2),
                   request_id="s", context_length=loaded.context_length)
    assert item.pixel_values.shape[1:] == (3, 224, 224)
    assert int((item.input_ids == loaded.processor.image_token_id).sum()) == 64 * item.image_tiles
    (out,) = Engine(loaded, max_batch_size=1).generate_batch([item])
    assert isinstance(out, Output) and 1 <= out.completion_tokens <= 2
