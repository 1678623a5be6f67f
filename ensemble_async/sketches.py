"""Summaries of a stream in fixed memory: histograms, a time series, a capped counter and
a uniform sample.

Each takes items one at a time and never holds more than its fixed size, whatever the
length of the stream; the run report (:mod:`ensemble_async.report`) builds on them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

__all__ = ["BoundedCounter", "Histogram", "Reservoir", "TimeSeries"]


class Histogram:
    """Counts of values in ``bins`` equal bins over ``[lo, hi]``; values outside are
    clamped into the first or last bin.  Also count, sum, min and max."""

    def __init__(self, lo: float, hi: float, bins: int) -> None:
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts = [0] * bins
        self.n = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._scale = bins / (hi - lo)
        self._last = bins - 1

    def add(self, value: float) -> None:
        i = int((value - self.lo) * self._scale)
        self.counts[i if 0 <= i <= self._last else (0 if i < 0 else self._last)] += 1
        self.n += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bin holding the ``q`` quantile (None when empty)."""
        if not self.n:
            return None
        rank = q * self.n
        seen = 0
        width = (self.hi - self.lo) / self.bins
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return min(self.lo + (i + 1) * width, self.max)
        return self.max

    def to_dict(self) -> dict[str, Any]:
        return {
            "lo": self.lo,
            "hi": self.hi,
            "counts": list(self.counts),
            "n": self.n,
            "mean": self.total / self.n if self.n else None,
            "min": self.min if self.n else None,
            "max": self.max if self.n else None,
            "p50": self.quantile(0.5),
            "p95": self.quantile(0.95),
        }


class TimeSeries:
    """Events per time bin from t=0 on, in at most ``bins`` bins: when a time falls past
    the last bin, neighbouring bins merge and the width doubles."""

    def __init__(self, bins: int = 120, width: float = 1.0) -> None:
        self.width = width
        self.counts = [0] * bins

    def add(self, t: float) -> None:
        t = max(t, 0.0)
        while t >= self.width * len(self.counts):
            merged = [a + b for a, b in zip(self.counts[::2], self.counts[1::2], strict=True)]
            self.counts = merged + [0] * (len(self.counts) - len(merged))
            self.width *= 2
        self.counts[int(t / self.width)] += 1

    def to_dict(self) -> dict[str, Any]:
        last = max((i for i, c in enumerate(self.counts) if c), default=-1)
        return {"bin_s": self.width, "counts": self.counts[: last + 1]}


class BoundedCounter:
    """A counter that keeps at most ``cap`` keys: when full, the least frequent half is
    dropped (so rare keys can be undercounted; frequent ones stay exact in practice)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counts: Counter[Any] = Counter()
        self.pruned = False

    def add(self, key: Any, n: int = 1) -> None:
        self.counts[key] += n
        if len(self.counts) > self.cap:
            keep = self.counts.most_common(self.cap // 2)
            self.counts = Counter(dict(keep))
            self.pruned = True

    def most_common(self, k: int) -> list[tuple[Any, int]]:
        return self.counts.most_common(k)


class Reservoir:
    """A uniform sample of at most ``k`` items from a stream (Li's algorithm L: once the
    sample is full, the position of the next kept item is drawn directly, so items that
    are skipped cost one comparison)."""

    def __init__(self, k: int, rng: random.Random) -> None:
        self.k = k
        self.rng = rng
        self.items: list[Any] = []
        self.seen = 0
        self._w = 1.0
        self._next = k

    def offer(self, item: Any) -> None:
        slot = self.slot()
        if slot is not None:
            self.put(slot, item)

    def _draw(self) -> None:
        rng = self.rng
        self._w *= math.exp(math.log(1.0 - rng.random()) / self.k)
        gap = math.log(1.0 - rng.random()) / math.log1p(-self._w) if self._w < 1.0 else 0.0
        self._next += int(gap) + 1

    def slot(self) -> int | None:
        """Count one more item; the slot it takes in the sample, or None when it is not kept
        (so a caller builds the item only when it is kept)."""
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(None)
            if len(self.items) == self.k:
                self._draw()
            return len(self.items) - 1
        if self.seen < self._next:
            return None
        self._draw()
        return self.rng.randrange(self.k)

    def put(self, slot: int, item: Any) -> None:
        self.items[slot] = item
