"""Admission control: how many requests may run at once, and how fast they may start.

* ``GlobalLimit`` is a fixed, fair (FIFO) concurrency limit, e.g. one shared by every
  member of an ensemble.
* ``AdaptiveLimiter`` is the same FIFO limit, but the limit adapts AIMD-style to what the
  server says: +1 per window of successes, x0.5 on an overload signal (429, 503/overloaded,
  a timeout), at most once per window.
* ``TokenBucket`` caps a rate: requests per minute (amount 1 per request) or tokens per
  minute (amount = ``estimate_tokens(request)``, corrected later with ``charge``/``refund``).

Usage::

    async with limiter.slot():
        completions = await backend.generate(request)

The slot classifies how its block ended (``classify``): no exception is a success, an
overload error is an overload signal, anything else (a fatal error, a cancellation, a
connection error) says nothing about capacity and is ignored.  Slots are always released,
and a waiter that is cancelled never keeps (or leaks) a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol

from .errors import OverloadedError, RateLimitedError, RequestTimeoutError
from .types import Completion, GenerationRequest

__all__ = [
    "AdaptiveLimiter",
    "GlobalLimit",
    "Outcome",
    "SlotSource",
    "TokenBucket",
    "classify",
    "estimate_tokens",
    "used_tokens",
]

OVERLOAD_ERRORS: tuple[type[BaseException], ...] = (
    RateLimitedError,
    OverloadedError,
    RequestTimeoutError,
)
"""Errors that mean "you are sending too much": they shrink an adaptive limit."""


class Outcome(enum.Enum):
    SUCCESS = "success"
    OVERLOAD = "overload"
    IGNORE = "ignore"


def classify(exc: BaseException | None) -> Outcome:
    """What a finished request says about the server's capacity."""
    if exc is None:
        return Outcome.SUCCESS
    if isinstance(exc, OVERLOAD_ERRORS):
        return Outcome.OVERLOAD
    return Outcome.IGNORE


class SlotSource(Protocol):
    """Anything that hands out concurrency slots (``GlobalLimit``, ``AdaptiveLimiter``)."""

    def slot(self) -> AbstractAsyncContextManager[Any]: ...


class _Permit:
    """One granted slot; remembers the limiter's state when it was granted."""

    __slots__ = ("epoch", "released")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.released = False


class _Slot:
    """``async with pool.slot():`` acquires on enter, releases (and reports) on exit."""

    __slots__ = ("_permit", "_pool")

    def __init__(self, pool: GlobalLimit) -> None:
        self._pool = pool
        self._permit: _Permit | None = None

    async def __aenter__(self) -> None:
        pool = self._pool
        if not pool._waiters and pool._in_flight < pool._limit:  # free: no coroutine
            self._permit = pool._grant()
        else:
            self._permit = await pool._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            self._pool._release(permit, classify(exc))


class GlobalLimit:
    """At most ``limit`` slots held at once; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._in_flight = 0
        self._epoch = 0
        self._waiters: deque[asyncio.Future[_Permit]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        """Slots held now."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Tasks queued for a slot."""
        return len(self._waiters)

    def slot(self) -> _Slot:
        return _Slot(self)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} limit={self._limit} in_flight={self._in_flight} "
            f"waiting={self.waiting}>"
        )

    # -- the FIFO core ----------------------------------------------------------------

    def _grant(self) -> _Permit:
        self._in_flight += 1
        self._on_grant()
        return _Permit(self._epoch)

    async def _acquire(self) -> _Permit:
        if not self._waiters and self._in_flight < self._limit:
            return self._grant()
        future: asyncio.Future[_Permit] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._on_queue()
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled():
                # A slot was handed over, but we were cancelled before we could use it.
                self._release(future.result(), Outcome.IGNORE)
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(future)
            raise

    def _release(self, permit: _Permit, outcome: Outcome) -> None:
        if permit.released:
            return
        permit.released = True
        self._in_flight -= 1
        self._on_release(permit, outcome)
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to the waiters, oldest first."""
        while self._waiters and self._in_flight < self._limit:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(self._grant())

    # Hooks for AdaptiveLimiter.
    def _on_grant(self) -> None:
        return None

    def _on_queue(self) -> None:
        return None

    def _on_release(self, permit: _Permit, outcome: Outcome) -> None:
        return None


class AdaptiveLimiter(GlobalLimit):
    """A FIFO concurrency limit that adapts AIMD-style between ``minimum`` and ``maximum``.

    * Additive increase: after ``limit`` successes (one "window") the limit grows by 1,
      but only if the window actually used the whole limit (a task had to queue, or the
      slots were all taken) -- an idle client learns nothing about the server's capacity.
    * Multiplicative decrease: an overload signal (``classify``) multiplies the limit by
      ``decrease_factor`` (floor ``minimum``), at most once per window: the requests that
      were already in flight when the limit shrank carry an old epoch, and their overload
      errors (typically a burst of 429s answering the same flood) are ignored.

    Holders above a freshly lowered limit keep their slots; new grants wait until the
    number in flight is below the limit again.
    """

    def __init__(
        self,
        initial: int,
        *,
        minimum: int = 1,
        maximum: int,
        decrease_factor: float = 0.5,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(
                f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}"
            )
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {decrease_factor}")
        super().__init__(initial)
        self._minimum = minimum
        self._maximum = maximum
        self._factor = decrease_factor
        self._successes = 0
        self._window_full = False
        self.increases = 0
        self.decreases = 0

    @property
    def minimum(self) -> int:
        return self._minimum

    @property
    def maximum(self) -> int:
        return self._maximum

    def set_maximum(self, maximum: int) -> None:
        """Change the upper bound (e.g. to the server's advertised max concurrency)."""
        if maximum < self._minimum:
            raise ValueError(f"maximum must be >= minimum ({self._minimum}), got {maximum}")
        self._maximum = maximum
        self._limit = min(self._limit, maximum)

    def _on_grant(self) -> None:
        if self._in_flight >= self._limit:
            self._window_full = True

    def _on_queue(self) -> None:
        self._window_full = True

    def _on_release(self, permit: _Permit, outcome: Outcome) -> None:
        if permit.epoch != self._epoch or outcome is Outcome.IGNORE:
            return  # from before the last decrease, or says nothing about capacity
        if outcome is Outcome.OVERLOAD:
            new = max(self._minimum, math.floor(self._limit * self._factor))
            if new < self._limit:
                self._limit = new
                self.decreases += 1
            self._epoch += 1
            self._start_window()
            return
        self._successes += 1
        if self._successes >= self._limit:
            if self._window_full and self._limit < self._maximum:
                self._limit += 1
                self.increases += 1
            self._start_window()

    def _start_window(self) -> None:
        self._successes = 0
        self._window_full = bool(self._waiters) or self._in_flight >= self._limit


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]


class TokenBucket:
    """A rate limit: ``rate_per_minute`` units refill continuously, up to ``burst``.

    ``acquire(amount)`` waits (FIFO) until the bucket holds ``min(amount, burst)`` units,
    then takes ``amount``: an amount above the burst is allowed and drives the bucket
    into debt, so later callers wait for it proportionally.  The default burst is ten
    seconds' worth of the rate (at least 1): enough to start smoothly without sending far
    more than a minute's quota in the first minute.

    Waiting is a sleep until the bucket has refilled enough (on the loop's clock unless
    ``clock``/``sleep`` are injected, which tests do).
    """

    def __init__(
        self,
        rate_per_minute: float,
        *,
        burst: float | None = None,
        clock: Clock | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not rate_per_minute > 0:
            raise ValueError(f"rate_per_minute must be > 0, got {rate_per_minute}")
        self.rate_per_minute = rate_per_minute
        self.burst = max(1.0, rate_per_minute / 6) if burst is None else burst
        if not self.burst > 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        self._per_second = rate_per_minute / 60.0
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp: float | None = None
        self._lock = asyncio.Lock()
        self._waiting = 0

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    def _refill(self) -> None:
        now = self._now()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._per_second)
        self._stamp = now

    @property
    def available(self) -> float:
        """Units in the bucket now (negative while in debt)."""
        self._refill()
        return self._tokens

    @property
    def waiting(self) -> int:
        """Callers inside ``acquire`` now."""
        return self._waiting

    async def acquire(self, amount: float = 1) -> None:
        """Wait for ``amount`` units, then take them.  Cancelling takes nothing."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        self._waiting += 1
        try:
            async with self._lock:
                need = min(amount, self.burst)
                self._refill()
                # (The tolerance keeps float rounding from asking for a 1e-17 s nap.)
                while need - self._tokens > 1e-9 * max(1.0, need):
                    await self._sleep((need - self._tokens) / self._per_second)
                    self._refill()
                self._tokens -= amount
        finally:
            self._waiting -= 1

    def charge(self, amount: float) -> None:
        """Take ``amount`` more units now, without waiting (may go into debt)."""
        self._refill()
        self._tokens -= amount

    def refund(self, amount: float) -> None:
        """Give back ``amount`` units taken too many (capped at the burst)."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + amount)

    def __repr__(self) -> str:
        return f"<TokenBucket {self.rate_per_minute:g}/min burst={self.burst:g}>"


def estimate_tokens(request: GenerationRequest) -> int:
    """A cheap upper-ish estimate of the tokens a request uses (for TPM limits):
    prompt characters / 4 plus ``max_new_tokens`` for each of the ``n`` completions."""
    if request.prompt is not None:
        chars = len(request.prompt)
    else:
        chars = sum(len(m.content) for m in request.messages or ())
    return math.ceil(chars / 4) + request.max_new_tokens * request.n


def used_tokens(request: GenerationRequest, completions: list[Completion]) -> int:
    """Tokens a finished request used, from the server's counts where it gave them
    (the prompt once, each completion's own length), else from the estimate."""
    prompt = next((c.prompt_tokens for c in completions if c.prompt_tokens is not None), None)
    if prompt is None:
        prompt = estimate_tokens(request.replace(n=1)) - request.max_new_tokens
    total = prompt
    for c in completions:
        total += c.completion_tokens if c.completion_tokens is not None else request.max_new_tokens
    return total
