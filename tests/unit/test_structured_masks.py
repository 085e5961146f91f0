"""Token bitmasks meet logits (model_runtime/structured.py): the right tokens, the right rows, nothing else."""

from __future__ import annotations

import pytest
import torch

from model_runtime.sampling import choose_tokens
from model_runtime.structured import RowMasks
from model_runtime.types import Sampling


def reference(bitmask: torch.Tensor, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Bit j of word w allows token 32w + j (as llguidance writes it)."""
    out = logits.clone()
    bits = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(bitmask.shape[0], -1)
    for row in rows:
        out[row] = out[row].masked_fill(bits[row, : logits.shape[1]] == 0, float("-inf"))
    return out


@pytest.mark.parametrize("width", [37, 384, 1000])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3], [2]])
def test_masks_forbid_exactly_the_cleared_bits_on_their_rows_only(width, rows):
    generator = torch.Generator().manual_seed(width)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, (width + 31) // 32), dtype=torch.int32, generator=generator)
    logits = torch.randn(4, width, generator=generator)
    expected = reference(bitmask, logits, rows)
    RowMasks(rows, bitmask).apply(logits)
    assert torch.equal(logits, expected)


def test_choose_tokens_picks_an_allowed_token_and_leaves_free_rows_alone():
    width = 64
    logits = torch.randn(3, width, generator=torch.Generator().manual_seed(3))
    free = logits.argmax(dim=-1).tolist()
    bitmask = torch.zeros((3, 2), dtype=torch.int32)
    bitmask[1, 0] = 1 << 5  # row 1 may only say token 5
    samplings = [Sampling(), Sampling(min_new_tokens=10), Sampling()]
    chosen = choose_tokens(logits.clone(), samplings, [lambda: torch.tensor([0])] * 3, [None] * 3,
                           generated=[0, 0, 0], eos_ids={5}, masks=RowMasks([1], bitmask))
    # The grammar alone decides when EOS may come on a constrained row: min_new_tokens does not forbid it.
    assert chosen == [free[0], 5, free[2]]
