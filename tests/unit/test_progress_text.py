"""settled_prefix: what live progress shows of a partial decode is always a prefix of the final text.

A byte-level decode (UTF-8 with replacement, like byte-level BPE), with and
without transformers' own space clean-up, cut at stop strings like the
engines cut the final text; every prefix of every random byte string is checked.
"""

from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerBase

from model_runtime.text import CLEANUP_HOLD_CHARS, cut_at_stop, settled_prefix

PIECES = [" ", ".", "?", "!", ",", "'", "n", "t", "s", "m", "v", "e", "r", "x", "\n", "é", "你", "好", "😀", "\xa0",
          " ' ", " n", " 's", " 're", " n ' t", " ' ve"]  # what the clean-up rules (and their chains) match
STOPS = [(), ("n't",), (" .",), ("re", "xx"), ("你好",), ("😀!",), ("e'", "'s", "?!x")]


def clean(text: str) -> str:
    return PreTrainedTokenizerBase.clean_up_tokenization(None, text)  # type: ignore[arg-type]


def decode(data: bytes, cleanup: bool) -> str:
    text = data.decode("utf-8", errors="replace")
    return clean(text) if cleanup else text


def random_bytes(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(1, 14)):
        roll = rng.random()
        if roll < 0.08:
            out += bytes([rng.randint(0x80, 0xFF)])  # a stray byte: an invalid sequence for good
        else:
            out += rng.choice(PIECES).encode()
    return out


@pytest.mark.parametrize("cleanup", [False, True], ids=["raw", "clean-up"])
def test_every_settled_prefix_is_a_prefix_of_the_final_text(cleanup):
    rng = random.Random(7)
    for _ in range(6000):
        data, stops = random_bytes(rng), rng.choice(STOPS)
        full = decode(data, cleanup)
        final = cut_at_stop(full, stops)
        final = full if final is None else final
        for k in range(len(data) + 1):  # byte by byte: every partial character is seen
            shown = settled_prefix(decode(data[:k], cleanup), stops, cleanup_spaces=cleanup)
            assert final.startswith(shown), (data, k, stops, shown, final)


def test_what_is_held_back():
    assert settled_prefix("abc\ufffd\ufffd") == "abc"  # a character still arriving
    assert settled_prefix("a\ufffdb") == "a\ufffdb"  # an invalid byte inside stays what it is
    assert settled_prefix("hello wor", ("world",)) == "hello "  # a stop may be completed
    assert settled_prefix("hello END more", ("END",)) == "hello "  # cut at a stop that occurred
    assert settled_prefix("hello", ("xyz",)) == "hello"  # nothing a stop begins with: all of it
    assert settled_prefix("it is n", cleanup_spaces=True) == "it is n"[:-CLEANUP_HOLD_CHARS]
    assert settled_prefix("ab", cleanup_spaces=True) == ""
