"""Keeping API keys out of everything we show or store: the one home of secret scrubbing.

A server may quote the key it was sent: in an error body, an echoed header, even inside
a generated text.  It may quote it whole or cut short, and in an encoding: JSON escapes
(``\\/`` for ``/``, ``\\uXXXX`` for non-ASCII under ``ensure_ascii``) or percent-encoding.
A :class:`Scrubber` built from the key replaces every such occurrence by ``***``:

* any run of text that contains at least :data:`MIN_FRAGMENT` consecutive characters of
  the key (a key shorter than that: the whole key), matched in every encoding above, the
  hexadecimal digits of escapes in lower or upper case;
* in ``str`` and in ``bytes`` (``scrub_bytes``, for raw bodies before they are decoded or
  quoted with ``repr``).

Stream text is scrubbed with :class:`ScrubHoldback`, which holds back what could still
turn out to be part of the key.  Field names that mark a secret (``api_key``, ...) are
recognised by :func:`is_secret_field` so that structured logs can drop those fields.

This module knows nothing about HTTP or backends; the transport and the adapters call it.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "MASK",
    "MIN_FRAGMENT",
    "ScrubHoldback",
    "Scrubber",
    "is_secret_field",
    "scrubbed_errors",
]

MASK = "***"
MIN_FRAGMENT = 8
"""A run of this many characters of the key is a leak, wherever it appears."""

_SECRET_WORDS = ("api_key", "apikey", "authorization", "password", "secret", "bearer")


def is_secret_field(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (its value must not be shown).
    The *name* of an environment variable holding a key (``api_key_env``) is no secret."""
    lowered = name.lower()
    if lowered.endswith("_env"):
        return False
    return any(word in lowered for word in _SECRET_WORDS)


def _json(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)[1:-1]


def _json_utf8(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)[1:-1]


def _json_slash(s: str) -> str:
    return _json(s).replace("/", "\\/")


def _json_utf8_slash(s: str) -> str:
    return _json_utf8(s).replace("/", "\\/")


def _percent(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _percent_plus(s: str) -> str:
    return urllib.parse.quote_plus(s, safe="")


def _percent_path(s: str) -> str:
    return urllib.parse.quote(s)


# Every encoding maps each character on its own, so an encoded fragment of the key is
# the fragment of the encoded key: matching encoded windows finds encoded prefixes too.
_ENCODINGS: tuple[Callable[[str], str], ...] = (
    lambda s: s,
    _json,
    _json_utf8,
    _json_slash,
    _json_utf8_slash,
    _percent,
    _percent_plus,
    _percent_path,
)


_ESCAPE_HEX = re.compile(r"(\\u[0-9a-fA-F]{4}|%[0-9a-fA-F]{2})")


def _hex_cases(encoded: str) -> set[str]:
    """``encoded`` with the hex digits of its escapes as they are, lower and upper case."""
    return {
        encoded,
        _ESCAPE_HEX.sub(lambda m: m.group(0)[:2] + m.group(0)[2:].lower(), encoded),
        _ESCAPE_HEX.sub(lambda m: m.group(0)[:2] + m.group(0)[2:].upper(), encoded),
    }


class Scrubber:
    """Replaces every leak of one secret (see the module docstring) by ``***``.

    ``Scrubber(None)`` or ``Scrubber("")`` scrubs nothing.
    """

    __slots__ = ("_bytes_pattern", "_pattern", "_window")

    def __init__(self, secret: str | None) -> None:
        self._pattern: re.Pattern[str] | None = None
        self._bytes_pattern: re.Pattern[bytes] | None = None
        self._window = 0
        if not secret:
            return
        window = min(MIN_FRAGMENT, len(secret))
        grams = {secret[i : i + window] for i in range(len(secret) - window + 1)}
        variants = {c for g in grams for enc in _ENCODINGS for c in _hex_cases(enc(g))}
        # the longest alternatives first, so a match takes as much as it can
        ordered = sorted(variants, key=lambda v: (-len(v), v))
        self._window = max(len(v) for v in ordered)
        self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
        self._bytes_pattern = re.compile(b"|".join(re.escape(v.encode("utf-8")) for v in ordered))

    def __repr__(self) -> str:  # never shows the secret
        return f"<Scrubber {'active' if self._pattern else 'inactive'}>"

    def __bool__(self) -> bool:
        return self._pattern is not None

    @property
    def lookbehind(self) -> int:
        """How many trailing characters of a growing text could still become a leak."""
        return max(0, self._window - 1)

    def spans(self, text: str, start: int = 0) -> list[tuple[int, int]]:
        """The runs of ``text`` (from ``start``) to mask: overlapping or touching
        matches merged."""
        if self._pattern is None:
            return []
        runs: list[tuple[int, int]] = []
        pos = start
        while pos < len(text):
            m = self._pattern.search(text, pos)
            if m is None:
                break
            start, end = m.span()
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end))
            else:
                runs.append((start, end))
            pos = start + 1  # windows overlap: look for the next one from the next char
        return runs

    def scrub(self, text: str) -> str:
        """``text`` with every leak of the secret replaced by ``***``."""
        if self._pattern is None or not text:
            return text
        runs = self.spans(text)
        if not runs:
            return text
        out, last = [], 0
        for start, end in runs:
            out.append(text[last:start])
            out.append(MASK)
            last = end
        out.append(text[last:])
        return "".join(out)

    def scrub_bytes(self, data: bytes) -> bytes:
        """``data`` with every leak replaced by ``***`` (for raw bodies)."""
        if self._bytes_pattern is None or not data:
            return data
        runs: list[tuple[int, int]] = []
        pos = 0
        while pos < len(data):
            m = self._bytes_pattern.search(data, pos)
            if m is None:
                break
            start, end = m.span()
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end))
            else:
                runs.append((start, end))
            pos = start + 1
        if not runs:
            return data
        out, last = [], 0
        for start, end in runs:
            out.append(data[last:start])
            out.append(MASK.encode())
            last = end
        out.append(data[last:])
        return b"".join(out)

    def mentions(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None


class ScrubHoldback:
    """Scrubs a text that arrives in pieces (a stream).

    ``feed(piece)`` returns the scrubbed text that is now settled: it never returns the
    last characters that could still be the start of a leak, nor a part of a masked run
    that may still grow.  The returned pieces add up to ``scrubber.scrub`` of what was
    fed so far, up to the held-back tail; ``finish(final)`` returns the rest of
    ``final`` (the adapter's scrubbed final text) not yet emitted.
    """

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._raw = ""
        self._done = 0  # raw characters already accounted for
        self._sent = ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._sent

    def feed(self, piece: str) -> str:
        if not self._scrubber:
            self._sent += piece
            return piece
        self._raw += piece
        settled = len(self._raw) - self._scrubber.lookbehind
        if settled <= self._done:
            return ""
        runs = self._scrubber.spans(self._raw, self._done)
        out: list[str] = []
        pos = self._done
        for start, end in runs:
            if end <= pos:
                continue
            if start >= settled:
                break
            if end >= settled:  # a run that may still grow: hold it back whole
                settled = max(pos, start)
                break
            out.append(self._raw[pos:start] + MASK)
            pos = end
        if settled > pos:
            out.append(self._raw[pos:settled])
            pos = settled
        self._done = pos
        emitted = "".join(out)
        self._sent += emitted
        return emitted

    def finish(self, final: str) -> str:
        sent = self._sent
        rest = final[len(sent) :] if final.startswith(sent) else ""
        self._sent += rest
        return rest


@contextmanager
def scrubbed_errors(scrubber: Scrubber) -> Iterator[None]:
    """Re-raise any exception with the secret masked in its message; an exception whose
    chained causes mention the secret loses the chain (its text is shown in tracebacks)."""
    try:
        yield
    except Exception as exc:
        if scrubber:
            scrub_exception(exc, scrubber)
        raise


def scrub_exception(exc: BaseException, scrubber: Scrubber) -> None:
    """Mask the secret in ``exc``'s message and args; cut a chain that mentions it."""
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        clean = scrubber.scrub(message)
        if clean != message:
            exc.message = clean  # type: ignore[attr-defined]
    if exc.args:
        exc.args = tuple(scrubber.scrub(a) if isinstance(a, str) else a for a in exc.args)
    seen: set[int] = set()
    link = exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if scrubber.mentions(str(link)) or scrubber.mentions(repr(link.args)):
            exc.__cause__ = exc.__context__ = None
            exc.__suppress_context__ = True
            return
        link = link.__cause__ or link.__context__
