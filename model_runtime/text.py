"""How a row's generated ids become text: its final text, and the part of a partial one that is settled.

`decode_text` is the one decode both engines' final `Output.text` goes
through (EOS excluded, special tokens skipped, the tokenizer's own space
clean-up); with stop strings, the final text is that decode cut before the
earliest stop (`cut_at_stop`).

`settled_prefix` is what live progress may show of a running row: a prefix of
the decode of its ids so far that its final text is sure to start with,
whatever tokens come next. It holds back
- a trailing U+FFFD: the bytes of a character still arriving (byte-level
  BPE, byte fallback) decode as a replacement until the character is whole;
- with `clean_up_tokenization_spaces`, the last CLEANUP_HOLD_CHARS
  characters: the clean-up deletes a space before what comes next (" ." →
  ".", " n't" → "n't"; " ' " → "'" can make a " n't" that the next rule
  removes, so a change reaches back at most 4 characters);
- from the earliest place a stop string occurs or could still be completed
  (the text ends with the start of one) to the end: the final text is cut there.

Importing this module does not import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CLEANUP_HOLD_CHARS = 4
REPLACEMENT = "\ufffd"


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of these generated ids, exactly as the engines decode a final `Output.text`."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the earliest stop string, or None if none occurs."""
    hits = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return text[: min(hits)] if hits else None


def settled_prefix(text: str, stops: Sequence[str] = (), *, cleanup_spaces: bool = False) -> str:
    """The prefix of `text` (a decode of a row's ids so far) that the row's final text starts with."""
    end = len(text.rstrip(REPLACEMENT))
    if cleanup_spaces:
        end = max(0, end - CLEANUP_HOLD_CHARS)
    settled = text[:end]
    for stop in stops:
        found = settled.find(stop)
        if found >= 0:
            end = min(end, found)
        # The longest end of `settled` that a stop begins with: that stop may still be completed.
        for k in range(min(len(stop) - 1, len(settled)), 0, -1):
            if settled.endswith(stop[:k]):
                end = min(end, len(settled) - k)
                break
    return settled[:end]


def settled_text(tokenizer: Any, ids: Sequence[int], stops: Sequence[str] = ()) -> str:
    """`settled_prefix` of the decode of `ids`, under this tokenizer's own clean-up setting."""
    cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    return settled_prefix(decode_text(tokenizer, ids), stops, cleanup_spaces=cleanup)
