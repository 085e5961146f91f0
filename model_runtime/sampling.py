"""Per-request decoding inside one running batch: each row picks its own next token.

Greedy rows take the argmax. Sampled rows apply, in transformers' order,
repetition penalty → temperature → top-k → top-p, then draw with their own
`torch.Generator`, so a seeded request draws the same numbers whatever its
neighbours are. Stop strings are checked on the decoded text (model_runtime/text.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from model_runtime.types import Sampling

if TYPE_CHECKING:
    from model_runtime.structured import RowMasks


def new_generator(sampling: Sampling, device: Any) -> torch.Generator | None:
    """A generator of this request's own; None for greedy requests."""
    if not sampling.do_sample:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on one row: `seen` are the ids so far, prompt included."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def _top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[-1] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def choose_tokens(logits: torch.Tensor, samplings: list[Sampling], seen: list[Callable[[], torch.Tensor]],
                  generators: list[torch.Generator | None], *, generated: list[int] | None = None,
                  eos_ids: set[int] | frozenset[int] = frozenset(), masks: RowMasks | None = None,
                  apply_masks: Callable[[RowMasks, torch.Tensor], None] | None = None) -> list[int]:
    """One next token per row of `logits` (rows × vocab), each row by its own settings.

    `seen[row]()` gives the row's ids so far (asked only for rows with a repetition penalty);
    `generated[row]` counts the row's tokens so far: below its min_new_tokens, EOS is masked.
    `masks` (structured output) forbid, on their rows only, what the row's grammar does not allow,
    before anything else; on those rows the grammar alone decides when EOS may come.
    """
    logits = logits.float()
    if masks is not None and apply_masks is not None:
        apply_masks(masks, logits)  # timed by its caller
    elif masks is not None:
        masks.apply(logits)
    constrained = set(masks.rows) if masks is not None else set()
    if generated is not None and eos_ids:
        early = [row for row, s in enumerate(samplings) if generated[row] < s.min_new_tokens and row not in constrained]
        if early:
            logits[torch.tensor(early)[:, None], torch.tensor(sorted(eos_ids))[None, :]] = float("-inf")
    chosen = logits.argmax(dim=-1).tolist()
    for row, sampling in enumerate(samplings):
        if not sampling.do_sample and sampling.repetition_penalty == 1.0:
            continue  # plain greedy: the vectorised argmax above
        scores = logits[row]
        if sampling.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, seen[row](), sampling.repetition_penalty)
        if not sampling.do_sample:
            chosen[row] = int(scores.argmax())
            continue
        scores = _top_p(_top_k(scores / sampling.temperature, sampling.top_k), sampling.top_p)
        probs = scores.softmax(dim=-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generators[row]))
    return chosen
