"""A byte-level tokenizer: token ids are the UTF-8 bytes of the text (vocabulary 256).

No merges and no special tokens, so every engine and test agrees on the ids without a
vocabulary file to ship.
"""

from __future__ import annotations

from collections.abc import Sequence

VOCAB_SIZE = 256


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of `text`, one token each."""
    return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    """Text from byte ids; a model may emit byte sequences that are not valid UTF-8."""
    return bytes(ids).decode("utf-8", errors="replace")
