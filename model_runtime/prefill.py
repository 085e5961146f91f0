"""Prompt side of the continuous engine: vision features, prompt embeddings, and prefill
(whole short prompts packed into one forward, long ones in chunks).

Packing puts several requests' prompt embeddings in one row, each with its
own position ids (restarting at 0) and a block-diagonal causal mask, so every
token attends to its own request only: one forward, nobody computes on
anybody's padding. The packed row's cache is then cut back into one cache per
request. The mask is built in the form the attention implementation takes
(transformers passes a ready 4D mask through as it is): booleans for sdpa,
additive floats for eager; flash_attention_2 takes no mask and finds the
sequence boundaries in the position ids (varlen).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from model_runtime.types import GenerationFailed


def image_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower + projector over tiles: (tiles, tokens per tile, hidden)."""
    config = model.config
    out = model.get_image_features(
        pixel_values=pixels.to(device=model.device, dtype=model.dtype),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True,
    )
    return out.pooler_output


def embed_prompt(model: Any, ids: torch.Tensor, features: list[torch.Tensor], image_token_id: int) -> torch.Tensor:
    """(1, prompt, hidden): token embeddings with every image placeholder replaced by its feature, in order."""
    embeds = model.get_input_embeddings()(ids)
    if features:
        flat = torch.cat(features).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        slots = ids == image_token_id
        if int(slots.sum()) != flat.shape[0]:
            raise GenerationFailed(f"{int(slots.sum())} image placeholders for {flat.shape[0]} features")
        embeds[slots] = flat
    return embeds[None]


def block_causal_mask(lengths: list[int], attn_implementation: str, dtype: torch.dtype,
                      device: Any) -> torch.Tensor | None:
    """(1, 1, total, total): token i sees token j iff both belong to one request and j <= i."""
    if attn_implementation == "flash_attention_2":
        return None
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    total = int(owner.shape[0])
    causal = torch.ones((total, total), dtype=torch.bool, device=device).tril()
    allowed = causal & (owner[:, None] == owner[None, :])
    if attn_implementation == "sdpa":
        return allowed[None, None]
    blocked = torch.zeros((total, total), dtype=dtype, device=device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def packed_prefill(model: Any, embeds: list[torch.Tensor], attn_implementation: str,
                   ) -> tuple[torch.Tensor, list[DynamicCache]]:
    """Prefill whole prompts (each (1, length, hidden)) in one forward; their last logits and own caches."""
    lengths = [int(e.shape[1]) for e in embeds]
    device = embeds[0].device
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    ends = torch.tensor(lengths, device=device).cumsum(0)
    out = model(
        inputs_embeds=torch.cat(embeds, dim=1), position_ids=positions,
        attention_mask=block_causal_mask(lengths, attn_implementation, embeds[0].dtype, device),
        past_key_values=DynamicCache(), use_cache=True, logits_to_keep=ends - 1,
    )
    layers = list(out.past_key_values)
    caches = []
    for end, length in zip(ends.tolist(), lengths, strict=True):
        start = end - length
        caches.append(DynamicCache(ddp_cache_data=[(k[:, :, start:end], v[:, :, start:end]) for k, v, *_ in layers]))
    return out.logits[0], caches


def chunk_prefill(model: Any, embeds: torch.Tensor, cache: DynamicCache, start: int, end: int) -> Any:
    """Prefill tokens [start, end) of one prompt on top of its cache; the output holds the last logits."""
    device = embeds.device
    return model(
        inputs_embeds=embeds[:, start:end], attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
        position_ids=torch.arange(start, end, device=device)[None], past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    )
