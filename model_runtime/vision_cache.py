"""Vision reuse: image features (after the vision tower and projector) kept per tile, keyed by its pixels.

Several questions about one image are a common shape of traffic; without this,
every job runs the vision tower over the same tiles again. The continuous
engine (model_runtime/engine_continuous.py) looks each tile up before a vision
call: a hit takes the stored features, tiles repeated within the call are
computed once, and only the rest reach the tower.

- The key is a SHA-256 digest of one prepared tile: its bytes, dtype and
  shape (current x86 and ARM servers have SHA-256 instructions: about twice
  BLAKE2b's speed here, ~1 ms for a 600 KB tile). Any change in the pixels or
  in the preprocessing settings (tile size, normalisation, dtype) gives other
  bytes and misses. A tile's features depend on that tile alone (InternVL
  encodes every tile and video frame separately), so a key per tile covers
  single images, multi-image prompts and video frames alike, and a tile two
  images share is computed once.
- Keys are computed off the model thread (`ensure_keys`: the worker calls it
  where it prepares a job, in a preprocessing process by default, and again
  at submit on the task thread, a no-op when set); the engine computes any
  still missing.
- Bounded in bytes (the features' own size; `IVQ_VISION_CACHE_MB`, 0 = off),
  least recently used evicted first. The features stay on the model's device;
  the worker takes the bound out of the KV budget (worker/model/thread.py).
- Only the model thread reads or writes it; `snapshot` is safe from any thread
  (plain ints, read without a lock).

This is not the idempotency key: that returns the first job for the same
request submitted twice; this serves different prompts over the same image.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from model_runtime.types import Prepared

DEFAULT_VISION_CACHE_MB = 256


def tile_keys(pixels: torch.Tensor) -> tuple[bytes, ...]:
    """One digest per row of `pixels` (tiles, channels, height, width), of its bytes, dtype and shape."""
    rows = pixels.detach().cpu().contiguous()
    meta = f"{rows.dtype}:{tuple(rows.shape[1:])}".encode()
    flat = rows.reshape(rows.shape[0], -1).view(torch.uint8) if rows.numel() else rows
    keys = []
    for index in range(int(rows.shape[0])):
        digest = hashlib.sha256(meta)
        digest.update(flat[index].numpy().data)  # hashlib releases the GIL on large buffers
        keys.append(digest.digest())
    return tuple(keys)


def ensure_keys(prepared: Prepared) -> None:
    """Set `prepared.tile_keys` if it has tiles and none yet (callable from any thread, before the engine sees it)."""
    if prepared.tile_keys is None and prepared.pixel_values is not None:
        prepared.tile_keys = tile_keys(prepared.pixel_values)


@dataclass(frozen=True)
class VisionCacheSnapshot:
    capacity_bytes: int
    bytes: int
    entries: int
    hits: int  # tiles served from the cache
    misses: int  # tiles that went to the vision tower
    deduped: int  # tiles repeated within one vision call, computed once (counted as misses once)
    evictions: int


class VisionCache:
    """Per-tile features, least recently used evicted first, at most `capacity_bytes` of them."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, int(capacity_bytes))
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.deduped = 0
        self.evictions = 0

    @classmethod
    def of_mb(cls, megabytes: float) -> VisionCache:
        return cls(int(megabytes * 1024 * 1024))

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> torch.Tensor | None:
        """The tile's features (tokens, hidden), now the most recently used; None on a miss (not counted)."""
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        """Store a copy of its own (a view would pin the whole batch's features); evict to fit."""
        if not self.enabled or key in self._entries:
            return
        size = features.numel() * features.element_size()
        if size > self.capacity_bytes:
            return
        while self.bytes + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1
        self._entries[key] = features.detach().clone()
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def snapshot(self) -> VisionCacheSnapshot:
        return VisionCacheSnapshot(self.capacity_bytes, self.bytes, len(self._entries), self.hits, self.misses,
                                   self.deduped, self.evictions)
