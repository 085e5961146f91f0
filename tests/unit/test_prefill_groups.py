"""similar_length_groups: which whole prompts the continuous engine prefills together, padded to the longest."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from model_runtime.prefill import FORWARD_TOKENS, PAD_SLACK, similar_length_groups


def test_alike_lengths_share_one_group_and_outliers_get_their_own() -> None:
    assert similar_length_groups([100, 104, 101, 108]) == [[0, 2, 1, 3]]
    assert similar_length_groups([10, 500, 12]) == [[0, 2], [1]]
    assert similar_length_groups([]) == []
    # Short prompts: padding a few dozen tokens is cheaper than one more forward.
    assert similar_length_groups([24, 58, 40]) == [[0, 2, 1]]
    assert similar_length_groups([24, 58, 40], forward_tokens=0) == [[0, 2], [1]]


@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=40))
def test_every_prompt_lands_in_exactly_one_group_whose_padding_stays_within_the_slack(lengths: list[int]) -> None:
    groups = similar_length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        sizes = [lengths[i] for i in group]
        assert len(sizes) * max(sizes) <= (1 + PAD_SLACK) * sum(sizes) + FORWARD_TOKENS or len(sizes) == 1
