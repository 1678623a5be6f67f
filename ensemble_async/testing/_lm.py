"""The doubles' made-up language model: deterministic log-probabilities.

A token's log-probability is a pure function of the text before it and the token's own
text, so the same text always scores the same, whichever request asks: the log-probs a
double reports while generating a completion equal those it reports when the prompt and
that completion are echoed back (as long as both split the text into the same tokens).
Only the last ``CONTEXT_CHARS`` characters of the context count, to keep long prompts
cheap.  Values lie in [-4.05, -0.05]; they are not a normalised distribution.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["CONTEXT_CHARS", "alternatives", "logprob", "split_words", "token_id"]

CONTEXT_CHARS = 64
_WORD = re.compile(r"\s*\S+")


def logprob(context: str, token: str) -> float:
    """log P(token | context) under the made-up model."""
    key = f"{context[-CONTEXT_CHARS:]}\x00{token}".encode()
    return -(50 + zlib.crc32(key) % 4001) / 1000  # three decimals, exactly as written


def token_id(text: str, vocab_size: int = 32000) -> int:
    """A stable id for a token text (ids below 100 are left to special tokens)."""
    return 100 + zlib.crc32(text.encode()) % (vocab_size - 100)


def split_words(text: str) -> list[str]:
    """Prompt tokens: whitespace-led words; trailing whitespace joins the last word, so
    the count equals ``len(text.split())`` (one token for all-whitespace text)."""
    words = _WORD.findall(text)
    if not words:
        return [text] if text else []
    tail = len(text) - sum(len(w) for w in words)
    if tail:
        words[-1] += text[-tail:]
    return words


def alternatives(context: str, chosen: str, pool: tuple[str, ...], k: int) -> list[str]:
    """``k`` other tokens from ``pool`` to list beside ``chosen`` as top candidates."""
    if k <= 0 or not pool:
        return []
    start = zlib.crc32(context[-CONTEXT_CHARS:].encode()) % len(pool)
    out: list[str] = []
    for i in range(len(pool)):
        candidate = pool[(start + i) % len(pool)]
        if candidate != chosen and candidate not in out:
            out.append(candidate)
            if len(out) == k:
                break
    return out
