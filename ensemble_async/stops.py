"""Stop strings, applied on the client: one home for every adapter.

Servers differ: TGI leaves the matched stop string in its text, some OpenAI-compatible
servers (``transformers serve``) ignore ``stop`` altogether, a local model only notices a
stop string after decoding.  Every adapter therefore runs its final text through
:func:`cut_at_stop`, and streams through :class:`StopHoldback`, so that a completion never
carries text at or past its first stop string, whatever the server did.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopHoldback", "cut_at_stop", "first_stop", "held_back"]


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop string starts in ``text`` at or after ``start`` (None if none)."""
    found = [p for p in (text.find(s, start) for s in stops if s) if p >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``(text before the first stop string, whether one was found)``."""
    cut = first_stop(text, stops)
    return (text, False) if cut is None else (text[:cut], True)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class StopHoldback:
    """Streams text while holding back what could still turn into a stop string.

    ``feed(piece)`` returns the text that is now safe to emit; the emitted pieces add up
    to the final text with the first stop string (and all after it) cut off.  ``stopped``
    says whether a stop string has been seen; after that ``feed`` returns ``""``.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._sent]

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self._text += piece
        if not self._stops:
            out = self._text[self._sent :]
            self._sent = len(self._text)
            return out
        start = self._sent
        # A stop string may straddle the boundary of what was already sent: search from
        # the earliest place one could have begun.
        longest = max(len(s) for s in self._stops)
        cut = first_stop(self._text, self._stops, max(0, start - longest + 1))
        if cut is not None:
            end = max(start, cut)
            self.stopped = True
        else:
            end = len(self._text) - held_back(self._text, self._stops)
        out = self._text[start:end]
        self._sent = max(start, end)
        return out

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the adapter's cut final text) not yet emitted."""
        sent = self.text
        return final[len(sent) :] if final.startswith(sent) else ""
