"""Prompt side of the continuous engine: vision features, prompt embeddings, and prefill
(whole prompts of similar length in one left-padded forward, long ones in chunks).

Whole prompts that join in one step are sorted by length and cut into groups
whose padding stays under `PAD_SLACK` of their tokens (`similar_length_groups`);
each group is one forward over a left-padded batch, with an attention mask
and per-row position ids, exactly as `generate` prefills a batch, so every row
computes what it would alone. Its cache comes out already in the running
batch's layout (left-padded rows), so nothing is cut apart afterwards.

Groups, not one packed row: packing every prompt into one sequence with a
block-diagonal mask makes sdpa and eager attend over the whole pack (quadratic
in the sum of the lengths). Measured on the "small" CPU model, 16 one-tile
prompts (1657 tokens): packed 606 ms, one padded group 201 ms.
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


PAD_SLACK = 0.25  # a group's padded tokens may exceed its real ones by this share
# ... plus this many: one more forward costs about as much as this many prompt tokens of padding
# (measured on CPU with the "small" model: 4.7 ms fixed + 0.055 ms a token, ~85 tokens; on a GPU a
# forward's fixed cost, 28 layers of kernel launches, is worth far more tokens than that).
FORWARD_TOKENS = 128


def similar_length_groups(lengths: list[int], slack: float = PAD_SLACK,
                          forward_tokens: int = FORWARD_TOKENS) -> list[list[int]]:
    """Indices into `lengths`, grouped so that rows x the longest stays within (1 + slack) x the sum
    + forward_tokens.

    Shortest first: each group grows while its padding stays within the slack,
    so a forward's extra cost (one per group) is only paid where padding would cost more.
    """
    groups: list[list[int]] = []
    total = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length = lengths[index]
        if groups and (len(groups[-1]) + 1) * length <= (1 + slack) * (total + length) + forward_tokens:
            groups[-1].append(index)
            total += length
        else:
            groups.append([index])
            total = length
    return groups


def padded_prefill(model: Any, embeds: list[torch.Tensor]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Prefill whole prompts (each (1, length, hidden)) as one left-padded batch.

    Returns each row's last logits (rows x vocab), the batch's cache (rows left-padded to the
    longest) and its attention mask (rows x longest; 1 where a row has a token).
    """
    lengths = [int(e.shape[1]) for e in embeds]
    longest = max(lengths)
    first = embeds[0]
    inputs = first.new_zeros((len(embeds), longest, first.shape[2]))
    mask = torch.zeros((len(embeds), longest), dtype=torch.long, device=first.device)
    for row, (embed, length) in enumerate(zip(embeds, lengths, strict=True)):
        inputs[row, longest - length :] = embed[0]
        mask[row, longest - length :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(),
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], out.past_key_values, mask


def chunk_prefill(model: Any, embeds: torch.Tensor, cache: DynamicCache, start: int, end: int) -> Any:
    """Prefill tokens [start, end) of one prompt on top of its cache; the output holds the last logits."""
    device = embeds.device
    return model(
        inputs_embeds=embeds[:, start:end], attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
        position_ids=torch.arange(start, end, device=device)[None], past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    )
