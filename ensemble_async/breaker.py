"""A circuit breaker: stop sending to a backend that keeps failing, probe it later.

States:

* ``closed``: calls go through.  ``failure_threshold`` consecutive failures open it.
* ``open``: calls are rejected at once with ``CircuitOpenError`` (not retryable, so an
  ensemble carries on with its other members).  After ``reset_timeout_s`` it turns
  half-open.
* ``half_open``: up to ``half_open_max`` probe calls go through at a time (others are
  rejected).  A probe success closes the breaker; a probe failure re-opens it.

What counts (``verdict``):

* failure: a ``RetryableError`` reaching the breaker (it wraps the retry loop, so the
  retries are already spent: timeouts, connection errors, 5xx, 429s that would not
  stop) and any non-``BackendError`` exception (an adapter failing in an unexpected
  way is not healthy either);
* neutral: a ``FatalError`` (bad request, context too long, auth, not found).  The
  server answered, but typically at validation, before any generation, so it proves
  neither health (TGI answers 422 instantly while its shard is crashed) nor sickness (a
  batch of bad prompts must not trip a healthy server).  Cancellations are neutral too;
* success: the call returned.

Results of calls admitted before the latest state change are ignored, so a slow call
from the closed era cannot re-open or close the breaker behind the probes' backs.
The clock is injectable so tests need no sleeping.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType

from .errors import BackendError, RetryableError

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError", "Verdict", "verdict"]


class CircuitOpenError(BackendError):
    """The backend's circuit breaker is open: the call was not attempted."""

    retryable = False

    def __init__(self, message: str, *, backend: str | None = None, retry_in: float = 0.0):
        super().__init__(message, backend=backend)
        self.retry_in = retry_in
        """Seconds until the breaker lets a probe through."""


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Verdict(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


def verdict(exc: BaseException | None) -> Verdict:
    """What a finished call says about the backend's health (see the module doc)."""
    if exc is None:
        return Verdict.SUCCESS
    if isinstance(exc, RetryableError):
        return Verdict.FAILURE
    if isinstance(exc, BackendError) or not isinstance(exc, Exception):
        return Verdict.NEUTRAL  # fatal errors, CircuitOpenError, cancellation
    return Verdict.FAILURE


class _Guard:
    """``with breaker.guard():`` admits on enter (or raises) and reports on exit."""

    __slots__ = ("_breaker", "_generation", "_probe")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._generation = -1
        self._probe = False

    def __enter__(self) -> None:
        self._generation, self._probe = self._breaker._admit()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._breaker._report(self._generation, self._probe, verdict(exc))


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        half_open_max: int = 1,
        clock: Callable[[], float] = time.monotonic,
        *,
        name: str | None = None,
        on_change: Callable[[BreakerState, BreakerState], object] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if reset_timeout_s < 0:
            raise ValueError(f"reset_timeout_s must be >= 0, got {reset_timeout_s}")
        if half_open_max < 1:
            raise ValueError(f"half_open_max must be >= 1, got {half_open_max}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max = half_open_max
        self.name = name
        self.on_change = on_change
        """Called with (old, new) on every state change (stats, logging)."""
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self.transitions: Counter[str] = Counter()
        """State changes so far, keyed ``"closed->open"`` and so on."""
        self.rejected = 0
        """Calls refused without being attempted."""

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose timeout has passed reads half-open)."""
        self._refresh()
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def guard(self) -> _Guard:
        """Context manager around one call: raises ``CircuitOpenError`` on enter when the
        call may not go through; reports the call's verdict on exit."""
        return _Guard(self)

    def _refresh(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout_s
        ):
            self._move(BreakerState.HALF_OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._failures = 0
        self._probes = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        self.transitions[f"{old}->{new}"] += 1
        if self.on_change is not None:
            self.on_change(old, new)

    def _admit(self) -> tuple[int, bool]:
        self._refresh()
        if self._state is BreakerState.CLOSED:
            return self._generation, False
        if self._state is BreakerState.HALF_OPEN and self._probes < self.half_open_max:
            self._probes += 1
            return self._generation, True
        self.rejected += 1
        if self._state is BreakerState.OPEN:
            wait = max(0.0, self._opened_at + self.reset_timeout_s - self._clock())
            message = f"circuit open after {self.failure_threshold} consecutive failures"
        else:
            wait = 0.0
            message = "circuit half-open and its probe calls are busy"
        raise CircuitOpenError(message, backend=self.name, retry_in=wait)

    def _report(self, generation: int, probe: bool, result: Verdict) -> None:
        if generation != self._generation:
            return  # admitted under an earlier state: no say any more
        if self._state is BreakerState.HALF_OPEN:
            if result is Verdict.SUCCESS:
                self._move(BreakerState.CLOSED)
            elif result is Verdict.FAILURE:
                self._move(BreakerState.OPEN)
            elif probe:
                self._probes -= 1  # a neutral probe frees its place for another
            return
        if result is Verdict.SUCCESS:
            self._failures = 0
        elif result is Verdict.FAILURE:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._move(BreakerState.OPEN)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures={self._failures}/{self.failure_threshold}>"
