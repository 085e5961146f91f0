"""The job mixes every benchmark runs: text only, one tile, many tiles, 8-frame video, realistic.

A mix is a list of `JobRequest`s plus the bytes of the media they name. The
media are sized from the model's tile size, so "one tile" is one tile on any
checkpoint and "many tiles" spreads over 2..12 tiles (plus the thumbnail)
through the processor's dynamic tiling. Everything is generated, seeded and
offline; the same arguments give the same mix.

Output lengths: by default each job asks for its own `max_new_tokens`,
log-uniform in 16..256 (`job_lengths`), as real traffic does; the list is
seeded from (seed, mix name) alone, so every engine and every run sees the
same lengths for the same jobs. `max_new_tokens=N` pins every job to N
instead (the fixed-length regime). Prompts and media do not depend on the
lengths: both regimes of a mix hold the same prompts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api_client.schema import GenerationParams, JobRequest

MIX_NAMES = ("text", "one_tile", "many_tiles", "video8", "realistic")

# Share of each kind in the realistic mix: mostly short chats and single photos.
REALISTIC = (("text", 0.35), ("one_tile", 0.35), ("many_tiles", 0.15), ("video8", 0.15))

PROMPTS = (
    "Describe this in detail.",
    "What is shown here? Answer in one sentence.",
    "List every object you can see and say what colour each one is.",
    "Is there a cat? Answer yes or no.",
    "Summarise what happens, first to last, and say what happens at the end.",
    "Read the text, then compare the left side with the right side and list the differences.",
)

# Per-job max_new_tokens: log-uniform between these (inclusive), so short answers are common and long ones occur.
MIN_NEW_TOKENS, MAX_NEW_TOKENS = 16, 256

# (columns, rows) of tiles: the processor picks the grid closest to the aspect ratio.
TILE_GRIDS = ((2, 1), (2, 2), (3, 2), (4, 3), (3, 3), (4, 2), (6, 2), (3, 4), (2, 3), (1, 2))


@dataclass
class Mix:
    name: str
    requests: list[JobRequest]
    media: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes
    description: str = ""


@dataclass
class MediaSet:
    """The media shared by all mixes, generated once."""

    tile: int
    one_tile: list[str]
    many_tiles: list[str]
    videos: list[str]
    data: dict[str, bytes]


def build_media(tile: int, *, images: int, videos: int, video_seconds: float = 4.0) -> MediaSet:
    from model_runtime.samples import make_sample_image, make_sample_video

    data: dict[str, bytes] = {}
    one, many, vids = [], [], []
    for i in range(images):
        name = f"one-{i}.jpg"
        data[name] = make_sample_image(tile, tile, seed=100 + i)
        one.append(name)
    for i in range(images):
        cols, rows = TILE_GRIDS[i % len(TILE_GRIDS)]
        name = f"many-{i}.jpg"
        data[name] = make_sample_image(cols * tile, rows * tile, seed=200 + i)
        many.append(name)
    for i in range(videos):
        name = f"clip-{i}.mp4"
        width = max(64, 2 * tile)
        data[name] = make_sample_video(seconds=video_seconds, fps=10, width=width, height=width * 3 // 4)
        vids.append(name)
    return MediaSet(tile, one, many, vids, data)


def _request(kind: str, i: int, media: MediaSet, url_of, rng: random.Random, max_new_tokens: int) -> JobRequest:
    prompt = f"{rng.choice(PROMPTS)} (item {i})"
    generation = GenerationParams(max_new_tokens=max_new_tokens)
    if kind == "text":
        # Text prompts of varied length, as chat traffic has.
        prompt = " ".join([prompt] * rng.randint(1, 4))
        return JobRequest.simple(prompt, generation=generation)
    if kind == "one_tile":
        return JobRequest.simple(prompt, images=[url_of(media.one_tile[i % len(media.one_tile)])],
                                 generation=generation)
    if kind == "many_tiles":
        return JobRequest.simple(prompt, images=[url_of(media.many_tiles[i % len(media.many_tiles)])],
                                 generation=generation)
    if kind == "video8":
        video = {"type": "video", "url": url_of(media.videos[i % len(media.videos)]), "num_frames": 8}
        return JobRequest(messages=[{"role": "user", "content": [video, {"type": "text", "text": prompt}]}],
                          generation=generation)
    raise ValueError(kind)


def job_lengths(seed: int, name: str, jobs: int, *, low: int = MIN_NEW_TOKENS,
                high: int = MAX_NEW_TOKENS) -> list[int]:
    """Each job's max_new_tokens, log-uniform in low..high, from (seed, mix name) only."""
    rng = random.Random(f"{seed}-{name}-lengths")
    return [min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))
            for _ in range(jobs)]


def build_mixes(media: MediaSet, url_of, *, jobs: int, max_new_tokens: int | None = None,
                names: tuple[str, ...] = MIX_NAMES, seed: int = 0) -> dict[str, Mix]:
    """`url_of(name)` turns a media file name into the URL the requests carry.

    max_new_tokens=None: per-job lengths (`job_lengths`); an int: every job asks for that many.
    """
    mixes: dict[str, Mix] = {}
    for name in names:
        rng = random.Random(f"{seed}-{name}")
        if name == "realistic":
            kinds = rng.choices([k for k, _ in REALISTIC], weights=[w for _, w in REALISTIC], k=jobs)
        else:
            kinds = [name] * jobs
        lengths = job_lengths(seed, name, jobs) if max_new_tokens is None else [max_new_tokens] * jobs
        requests = [_request(kind, i, media, url_of, rng, length)
                    for i, (kind, length) in enumerate(zip(kinds, lengths, strict=True))]
        used = {n for r in requests for item in r.media_items() for n in [item.url.rsplit("/", 1)[-1]]}
        mixes[name] = Mix(name, requests, {n: media.data[n] for n in used}, description=", ".join(
            f"{k} {kinds.count(k)}" for k in dict.fromkeys(kinds)))
    return mixes


def write_media(media: MediaSet, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in media.data.items():
        path = root / name
        if not path.exists() or path.stat().st_size != len(data):
            path.write_bytes(data)


def decode_media(requests: list[JobRequest], read, limits: Any) -> list[dict[str, Any]]:
    """For each request, its url -> decoded media map (what the task thread builds)."""
    from api_client.schema import ImageItem
    from model_runtime.media import decode_image, decode_video

    cache: dict[tuple[str, int | None], Any] = {}
    out = []
    for request in requests:
        decoded = {}
        for item in request.media_items():
            key = (item.url, getattr(item, "num_frames", None))
            if key not in cache:
                data = read(item.url)
                cache[key] = (decode_image(data, limits) if isinstance(item, ImageItem)
                              else decode_video(data, limits, item.num_frames))
            decoded[item.url] = cache[key]
        out.append(decoded)
    return out
