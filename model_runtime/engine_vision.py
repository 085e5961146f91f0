"""Step 3 of the continuous engine: the vision tower over the joining requests' next tiles, with vision reuse.

One vision call a step covers every joiner's next tiles, within a budget of
tiles to compute. With the vision cache on (model_runtime/vision_cache.py),
each tile is looked up by its content digest first: a stored tile costs
nothing, a tile repeated within the call (two jobs about one image joining
together) is computed once, and only the rest reach the tower; what it
computes is stored. With it off, every tile is computed, as before.
Features are split back per request in prompt order; once a request has all
of its tiles, its prompt is embedded (placeholders replaced by features).

A mixin of `ContinuousEngine` (model_runtime/engine_continuous.py), like
`Admission`: it works on that engine's joiners, model and counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from model_runtime.prefill import embed_prompt, image_features
from model_runtime.running_batch import ContinuousStats, Joining
from model_runtime.vision_cache import VisionCache, ensure_keys


class VisionStep:
    # The engine's state this works on (set by ContinuousEngine.__init__).
    model: Any
    image_token_id: int
    stats: ContinuousStats
    vision_cache: VisionCache
    _joining: list[Joining]
    _joining_failed: Callable[[list[Joining], Exception, list], None]  # MemoryPolicy's

    def _encode_tiles(self, finished: list, budget: int) -> None:
        """Plan this step's vision call: tiles from each joiner, within `budget` tiles that must be computed
        (with the vision cache on, tiles it holds and tiles repeated in this call cost nothing)."""
        cache = self.vision_cache
        planned: set[bytes] = set()
        parts: list[tuple[Joining, int, int]] = []  # (joiner, first tile, tiles)
        for joining in self._joining:
            if joining.embeds is not None:
                continue
            start = end = joining.tiles_done
            keys = None
            if cache.enabled:
                ensure_keys(joining.prepared)
                keys = joining.prepared.tile_keys
            while end < joining.prepared.tiles:
                key = keys[end] if keys is not None else None
                free = key is not None and (key in planned or key in cache)
                if not free:
                    if budget <= 0:
                        break
                    budget -= 1
                    if key is not None:
                        planned.add(key)
                end += 1
            if end > start:
                parts.append((joining, start, end - start))
        if parts:
            self._encode_parts(parts, finished)
        for joining in list(self._joining):
            if joining.embeds is None and joining.tiles_done == joining.prepared.tiles:
                try:
                    joining.embeds = embed_prompt(self.model, joining.row.prompt_ids, joining.features,
                                                  self.image_token_id)
                    joining.features = []
                except Exception as exc:  # noqa: BLE001
                    self._joining_failed([joining], exc, finished)

    def _encode_parts(self, parts: list[tuple[Joining, int, int]], finished: list) -> None:
        """One vision call over these tiles (cached and repeated ones left out); on an error other than OOM,
        each request again alone, so one bad input fails only itself."""
        cache = self.vision_cache
        plans: list[list[torch.Tensor | int]] = []  # per part, per tile: cached features, or a row of the call
        rows: list[torch.Tensor] = []
        computed: dict[bytes, int] = {}  # key -> its row in this call
        hits = deduped = called = 0  # called: rows of the vision call so far
        for joining, start, count in parts:
            pixels = joining.tile_pixels(start, count)
            keys = joining.prepared.tile_keys if cache.enabled else None
            if keys is None:
                plans.append(list(range(called, called + count)))
                rows.append(pixels)
                called += count
                continue
            plan: list[torch.Tensor | int] = []
            for offset, key in enumerate(keys[start : start + count]):
                if key in computed:
                    plan.append(computed[key])
                    deduped += 1
                elif (stored := cache.get(key)) is not None:
                    plan.append(stored)
                    hits += 1
                else:
                    computed[key] = called
                    plan.append(called)
                    rows.append(pixels[offset : offset + 1])
                    called += 1
            plans.append(plan)
        features = None
        if rows:
            pixels = torch.cat(rows)
            try:
                features = image_features(self.model, pixels)
            except Exception as exc:  # noqa: BLE001 - fails (or defers) only the requests in this call
                if len(parts) > 1 and not isinstance(exc, torch.cuda.OutOfMemoryError):
                    for part in parts:
                        self._encode_parts([part], finished)
                    return
                self._joining_failed([j for j, _, _ in parts], exc, finished)
                return
            self.stats.vision_calls += 1
            self.stats.vision_tiles += int(pixels.shape[0])
            for key, row in computed.items():
                cache.put(key, features[row])
        cache.hits += hits
        cache.deduped += deduped
        cache.misses += len(computed)
        for (joining, _, count), plan in zip(parts, plans, strict=True):
            joining.features.append(_gather(features, plan))
            joining.tiles_done += count


def _gather(features: torch.Tensor | None, plan: list[torch.Tensor | int]) -> torch.Tensor:
    """A part's features (tiles, tokens, hidden): a slice of the call's when its rows are consecutive, else stacked."""
    rows = [p for p in plan if isinstance(p, int)]
    if features is not None and len(rows) == len(plan) and rows == list(range(rows[0], rows[0] + len(rows))):
        return features[rows[0] : rows[0] + len(rows)]
    assert features is not None or not rows  # rows of the call exist only when it ran
    return torch.stack([p if isinstance(p, torch.Tensor) else features[p] for p in plan])  # type: ignore[index]
