"""Vision reuse in the continuous engine: jobs sharing an image run the tower once, and nothing changes answers.

Greedy tokens with the cache on must equal those with it off and those of
`model.generate` alone, for single images, multi-image prompts and video
frames, whether the jobs that share media join together (one vision call,
repeated tiles computed once) or arrive later (served from the cache).
The cache's own bounds (bytes, least recently used) are tested on it alone.
"""

from __future__ import annotations

import torch

from model_runtime.prompts import simple_chat
from model_runtime.types import Output, Prepared, Sampling
from model_runtime.vision_cache import VisionCache, ensure_keys, tile_keys
from tests.integration.test_engine_continuous import CLIP, IMG, TALL, engine, media, prep, solo_tokens

__all__ = ["media"]  # the module-scoped fixture, shared

QUESTIONS = ("Describe.", "What is shown in the picture?", "How many objects are there?")


def shared_jobs(runtime, media, tag: str) -> list[Prepared]:
    """Three questions each over one image, a pair of images, and a video: repeated media everywhere."""
    chats = [simple_chat(q, images=[IMG]) for q in QUESTIONS]
    chats += [simple_chat(q, images=[IMG, TALL]) for q in QUESTIONS[:2]]
    chats += [simple_chat(q, videos=[CLIP]) for q in QUESTIONS[:2]]
    return [prep(runtime, chat, media, Sampling(max_new_tokens=12), f"{tag}-{i}") for i, chat in enumerate(chats)]


def unique_tiles(items: list[Prepared]) -> int:
    keys: set[bytes] = set()
    for item in items:
        ensure_keys(item)
        keys.update(item.tile_keys or ())
    return len(keys)


def tokens(outs: list) -> list[list[int]]:
    assert all(isinstance(o, Output) for o in outs), outs
    return [o.token_ids for o in outs]


def test_jobs_sharing_media_give_the_same_tokens_with_the_cache_on_off_and_alone(tiny_runtime, media):
    items = shared_jobs(tiny_runtime, media, "on")
    alone = [solo_tokens(tiny_runtime, p) for p in items]
    off = engine(tiny_runtime, vision_cache_mb=0, vision_chunk_tiles=64)
    on = engine(tiny_runtime, vision_chunk_tiles=64)
    off_tokens = tokens(off.run_until_done(shared_jobs(tiny_runtime, media, "off")))
    on_tokens = tokens(on.run_until_done(items))
    assert on_tokens == off_tokens == alone
    assert len({tuple(t) for t in alone}) > 3  # the prompts differ: so do the answers
    # Off: every tile of every job through the tower. On: each distinct tile once, within one joining group.
    assert off.stats.vision_tiles == sum(p.tiles for p in items)
    assert on.stats.vision_tiles == unique_tiles(items) < off.stats.vision_tiles / 2
    cache = on.vision_cache.snapshot()
    assert cache.misses == unique_tiles(items) and cache.hits == 0
    assert cache.deduped == sum(p.tiles for p in items) - unique_tiles(items)
    assert off.vision_cache.snapshot().misses == 0 and len(off.vision_cache) == 0


def test_jobs_arriving_later_are_served_from_the_cache_and_keep_their_solo_tokens(tiny_runtime, media):
    eng = engine(tiny_runtime)
    first = shared_jobs(tiny_runtime, media, "first")
    tokens(eng.run_until_done(first))
    tiles_before, calls_before = eng.stats.vision_tiles, eng.stats.vision_calls
    later = [prep(tiny_runtime, simple_chat(q, images=[TALL, IMG]), media, Sampling(max_new_tokens=12), f"later-{i}")
             for i, q in enumerate(("Read the text in the image.", "Compare the two images."))]
    later.append(prep(tiny_runtime, simple_chat("What happens first?", videos=[CLIP]), media,
                      Sampling(max_new_tokens=12), "later-video"))
    assert tokens(eng.run_until_done(later)) == [solo_tokens(tiny_runtime, p) for p in later]
    assert eng.stats.vision_tiles == tiles_before and eng.stats.vision_calls == calls_before  # no tower at all
    assert eng.vision_cache.snapshot().hits == sum(p.tiles for p in later)


def test_a_changed_pixel_misses_the_cache(tiny_runtime, media):
    eng = engine(tiny_runtime)
    item = prep(tiny_runtime, simple_chat("Describe.", images=[IMG]), media, Sampling(max_new_tokens=8), "a")
    eng.run_until_done([item])
    assert item.pixel_values is not None
    changed_pixels = item.pixel_values.clone()
    changed_pixels[1, 0, 3, 5] += 0.01  # one value of one tile
    changed = prep(tiny_runtime, simple_chat("Describe.", images=[IMG]), media, Sampling(max_new_tokens=8), "b")
    changed.pixel_values = changed_pixels
    before = eng.vision_cache.snapshot()
    out = eng.run_until_done([changed])[0]
    after = eng.vision_cache.snapshot()
    assert after.misses - before.misses == 1 and after.hits - before.hits == item.tiles - 1
    assert isinstance(out, Output) and out.token_ids == solo_tokens(tiny_runtime, changed)


def test_tile_keys_follow_the_bytes_the_dtype_and_the_shape():
    pixels = torch.rand(3, 3, 8, 8)
    keys = tile_keys(pixels)
    assert len(set(keys)) == 3 and keys == tile_keys(pixels.clone())
    nudged = pixels.clone()
    nudged[2, 1, 7, 7] += 1e-6
    assert tile_keys(nudged)[:2] == keys[:2] and tile_keys(nudged)[2] != keys[2]
    assert set(tile_keys(pixels.to(torch.bfloat16))).isdisjoint(keys)  # another dtype: another preprocessing
    assert tile_keys(pixels.reshape(3, 3, 4, 16))[0] != keys[0]  # same bytes, another shape


def test_the_cache_stays_within_its_bytes_and_evicts_the_least_recently_used():
    entry = torch.zeros(4, 8)  # 128 bytes
    cache = VisionCache(capacity_bytes=3 * 128 + 64)
    for key in (b"a", b"b", b"c"):
        cache.put(key, entry)
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", entry)
    assert b"b" not in cache and {b"a", b"c", b"d"} == {k for k in (b"a", b"b", b"c", b"d") if k in cache}
    snap = cache.snapshot()
    assert snap.bytes == 3 * 128 <= snap.capacity_bytes and snap.evictions == 1 and snap.entries == 3
    cache.put(b"huge", torch.zeros(100, 8))  # larger than the whole cache: not stored, nothing evicted
    assert b"huge" not in cache and len(cache) == 3
    stored = torch.ones(4, 8)
    cache.put(b"e", stored[:, :])
    stored += 1
    assert torch.equal(cache.get(b"e"), torch.ones(4, 8))  # a copy of its own, not a view
    assert VisionCache(0).enabled is False


def test_a_small_cache_evicts_and_answers_stay_exact(tiny_runtime, media):
    """A bound below one job's tiles: features are evicted while others are still being joined."""
    per_tile = int(tiny_runtime.model.config.image_seq_length) * int(
        tiny_runtime.model.config.get_text_config().hidden_size) * 4
    eng = engine(tiny_runtime, vision_cache_mb=(2.5 * per_tile) / (1024 * 1024), vision_chunk_tiles=2)
    items = shared_jobs(tiny_runtime, media, "small")
    assert tokens(eng.run_until_done(items)) == [solo_tokens(tiny_runtime, p) for p in items]
    snap = eng.vision_cache.snapshot()
    assert snap.bytes <= snap.capacity_bytes and snap.entries == 2 and snap.evictions > 0
