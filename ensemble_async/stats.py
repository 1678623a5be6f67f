"""Per-backend counters for progress displays, in memory that does not grow with use.

Latency percentiles come from a fixed-size reservoir (Vitter's algorithm R: a uniform
sample of every latency recorded so far, exact while fewer than ``reservoir`` have been
seen).  Rates come from per-second buckets over the last ``window_s`` seconds.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["BackendStats", "RateWindow", "Reservoir", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of sorted data, interpolating linearly between
    the closest ranks (numpy's default method); None for no data."""
    if not sorted_values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Reservoir:
    """A uniform random sample of at most ``size`` values out of all values added."""

    def __init__(self, size: int = 2048, *, seed: int | None = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.count = 0
        self._values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        if len(self._values) < self.size:
            self._values.append(value)
            return
        j = self._rng.randrange(self.count)
        if j < self.size:
            self._values[j] = value

    def __len__(self) -> int:
        return len(self._values)

    def percentiles(self, *qs: float) -> list[float | None]:
        ordered = sorted(self._values)
        return [percentile(ordered, q) for q in qs]


class RateWindow:
    """Sums of events per second over the last ``window_s`` seconds (bounded buckets)."""

    def __init__(self, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic):
        if window_s < 1:
            raise ValueError(f"window_s must be >= 1, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._start = clock()
        self._buckets: deque[list[float]] = deque(maxlen=math.ceil(window_s) + 1)

    def add(self, requests: float = 1, tokens: float = 0) -> None:
        second = math.floor(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += requests
            self._buckets[-1][2] += tokens
        else:
            self._buckets.append([second, requests, tokens])

    def rates(self) -> tuple[float, float]:
        """(requests/s, tokens/s) over the window (or since creation, if shorter)."""
        now = self._clock()
        span = min(self.window_s, now - self._start)
        if span <= 0:
            return 0.0, 0.0
        cutoff = now - span
        requests = tokens = 0.0
        for second, r, t in self._buckets:
            if second + 1 > cutoff:
                requests += r
                tokens += t
        return requests / span, tokens / span


class BackendStats:
    """What one member has done: counts, tokens, latencies, rates, errors, breaker state.

    ``done``/``failed`` count requests sent to the backend (after retries); ``retried``
    counts retries; ``errors`` counts every failed attempt by error class (retried or
    final); ``latency`` is the backend call time of successful attempts (queueing and
    backoff excluded).  ``cache_hits`` counts calls answered from the response cache:
    they are not requests and add nothing to the other counters, tokens, rates or
    latencies; ``cache_misses`` counts calls the backend answered and the cache stored.
    ``cached``: whether a cache is in use (the snapshot shows the two counts only then).
    """

    def __init__(
        self,
        name: str = "",
        *,
        reservoir: int = 2048,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        cached: bool = False,
    ) -> None:
        self.name = name
        self.cached = cached
        self.cache_hits = 0
        self.cache_misses = 0
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.cancelled = 0
        self.retried = 0
        self.completions = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.errors: Counter[str] = Counter()
        self.breaker_state: str | None = None
        self.latency = Reservoir(reservoir)
        self.window = RateWindow(window_s, clock=clock)

    def started(self) -> None:
        self.in_flight += 1

    def succeeded(
        self,
        latency_s: float,
        *,
        completions: int = 1,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.in_flight -= 1
        self.done += 1
        self.completions += completions
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.latency.add(latency_s)
        self.window.add(1, prompt_tokens + completion_tokens)

    def failed_with(self, exc: BaseException) -> None:
        self.in_flight -= 1
        self.failed += 1
        self.errors[type(exc).__name__] += 1

    def was_cancelled(self) -> None:
        self.in_flight -= 1
        self.cancelled += 1

    def cache_hit(self) -> None:
        self.cache_hits += 1

    def cache_miss(self) -> None:
        self.cache_misses += 1

    def retrying_after(self, exc: BaseException) -> None:
        self.retried += 1
        self.errors[type(exc).__name__] += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready picture of the counters now."""
        p50, p95, p99 = self.latency.percentiles(50, 95, 99)
        rps, tps = self.window.rates()
        cache = (
            {"cache_hits": self.cache_hits, "cache_misses": self.cache_misses}
            if self.cached
            else {}
        )
        return {
            "name": self.name,
            "in_flight": self.in_flight,
            "done": self.done,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "retried": self.retried,
            "completions": self.completions,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_s": {"p50": p50, "p95": p95, "p99": p99, "samples": len(self.latency)},
            "requests_per_s": rps,
            "tokens_per_s": tps,
            "errors": dict(self.errors),
            "breaker": self.breaker_state,
            **cache,
        }
