"""A byte-level tokenizer for the random-weight model: no vocabulary file, no download.

Prompts are UTF-8 bytes (ids 0..255), so `prompt_len` ASCII characters are exactly
`prompt_len` prompt tokens, which keeps load and memory arithmetic in tests exact. The
model's weights are random, so its output is not language: a generated id is shown as
one printable ASCII character, a deterministic rendering that makes every generated
token visible in `choices[0].text`.
"""

from __future__ import annotations

__all__ = ["EOS_TOKEN_ID", "VOCAB_SIZE", "decode", "encode"]

VOCAB_SIZE = 512
# NUL never occurs in a text prompt, so it is free to serve as end-of-sequence.
EOS_TOKEN_ID = 0
_PRINTABLE = [chr(c) for c in range(32, 127)]


def encode(text: str) -> list[int]:
    """Token ids of `text`: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Text of generated `ids`: one printable ASCII character per token."""
    return "".join(_PRINTABLE[i % len(_PRINTABLE)] for i in ids)
