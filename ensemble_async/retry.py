"""Retries: the one place where a failed request is tried again (built on tenacity).

``RetryPolicy.run(fn)`` calls ``fn`` until it succeeds, raises an error that a retry
cannot help (anything that is not a ``RetryableError``: a ``FatalError``, a cancellation,
a bug), or the policy gives up; then the last real error propagates as itself.

Waits: exponential backoff ``initial_backoff_s * 2**(k-1)`` capped at ``max_backoff_s``,
with ``jitter`` (0 = none, 1 = "full jitter": uniform in (0, backoff]).  A server's
``Retry-After`` (``RateLimitedError``/``OverloadedError.retry_after``) is a floor:
wait = max(backoff, retry_after).

Bounds: at most ``max_attempts`` attempts, and no retry starts after ``max_total_s``
seconds from the first attempt: a wait is cut to the time left, and when the server's
Retry-After alone exceeds the time left the policy gives up at once.  ``max_total_s``
does not cut a running attempt short.

Timeouts are not applied here.  ``attempt_timeout_s`` is the per-attempt limit a
``Member`` applies around its backend call (its one home, so the wait for admission is
never timed); ``attempt_timeout``/``attempt_deadline`` are the tools it uses: their
expiry is a retryable ``RequestTimeoutError``.

``sleep``, ``clock`` and ``rng`` are injectable so tests run without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar, cast

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from .errors import OverloadedError, RateLimitedError, RequestTimeoutError, RetryableError

__all__ = [
    "RetryEvent",
    "RetryPolicy",
    "attempt_deadline",
    "attempt_timeout",
    "is_retryable",
    "retry_after_of",
]

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_retryable(exc: BaseException) -> bool:
    """Only ``RetryableError`` subclasses are retried (never ``FatalError`` or others)."""
    return isinstance(exc, RetryableError) and exc.retryable


def retry_after_of(exc: BaseException | None) -> float | None:
    """The server's Retry-After, in seconds, if the error carries one."""
    if isinstance(exc, RateLimitedError | OverloadedError):
        return exc.retry_after
    return None


class _AttemptDeadline:
    """The context manager behind ``attempt_timeout``/``attempt_deadline`` (a class, not
    a generator: it is entered once per request, so it is kept cheap)."""

    __slots__ = ("_backend", "_scope", "_seconds", "_when")

    def __init__(self, when: float | None, seconds: float | None, backend: str | None) -> None:
        self._when = when
        self._seconds = seconds
        self._backend = backend
        self._scope: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        when = self._when
        if when is None:
            if self._seconds is None:
                return
            when = asyncio.get_running_loop().time() + self._seconds
        self._scope = asyncio.timeout_at(when)
        await self._scope.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope, self._scope = self._scope, None
        if scope is None:
            return
        try:
            await scope.__aexit__(exc_type, exc, tb)
        except TimeoutError as timeout:
            if scope.expired():
                seconds = self._seconds
                limit = f"{seconds:g}s" if seconds is not None else "its deadline"
                raise RequestTimeoutError(
                    f"attempt timed out after {limit}", backend=self._backend
                ) from timeout
            raise


def attempt_timeout(
    seconds: float | None, *, backend: str | None = None
) -> AbstractAsyncContextManager[None]:
    """``asyncio.timeout`` whose own expiry raises a retryable ``RequestTimeoutError``
    (the limit starts when the block is entered; ``None``: no limit).

    A ``TimeoutError`` raised inside the block for another reason passes unchanged.
    """
    return _AttemptDeadline(None, seconds, backend)


def attempt_deadline(
    when: float | None, seconds: float | None, *, backend: str | None = None
) -> AbstractAsyncContextManager[None]:
    """Like ``attempt_timeout`` but up to the loop time ``when`` (None: no limit), so
    several steps of one attempt (the events of a stream) share one limit of
    ``seconds`` (used in the error message)."""
    if when is None:
        return _AttemptDeadline(None, None, backend)
    return _AttemptDeadline(when, seconds, backend)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Reported to ``on_retry`` before each wait: attempt ``attempt`` failed with
    ``error`` and the next attempt starts in ``wait_s`` seconds."""

    attempt: int
    error: BaseException
    wait_s: float


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to retry; immutable and shareable between members."""

    max_attempts: int = 5
    max_total_s: float = 120.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter: float = 1.0
    attempt_timeout_s: float | None = None
    """The per-attempt limit a ``Member`` applies to its backend call (not ``run``)."""
    sleep: Callable[[float], Awaitable[Any]] = field(
        default=asyncio.sleep, repr=False, compare=False
    )
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_total_s < 0:
            raise ValueError(f"max_total_s must be >= 0, got {self.max_total_s}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.attempt_timeout_s is not None and not self.attempt_timeout_s > 0:
            raise ValueError(f"attempt_timeout_s must be > 0, got {self.attempt_timeout_s}")

    @classmethod
    def never(cls) -> RetryPolicy:
        """One attempt, no retries."""
        return cls(max_attempts=1)

    def backoff(self, attempt: int) -> float:
        """The jittered backoff after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (attempt - 1))
        return base * (1.0 - self.jitter * self.rng.random())

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        on_retry: Callable[[RetryEvent], object] | None = None,
    ) -> T:
        """Call ``fn`` until it succeeds or the policy gives up (then its error propagates).

        ``fn`` times itself (see the module doc); ``on_retry`` is called before each wait.
        """
        started = self.clock()
        # Fast path: the first attempt runs bare (no closures, no tenacity machinery,
        # which is costly per call: bench/memory.py, bench/overhead.py); all of that is
        # built only once a retry is really needed.
        try:
            return await fn()
        except BaseException as exc:
            if not is_retryable(exc):
                raise
            first_error = exc
        return await self.run_after(first_error, fn, started=started, on_retry=on_retry)

    async def run_after(
        self,
        first_error: BaseException,
        fn: Callable[[], Awaitable[T]],
        *,
        started: float,
        on_retry: Callable[[RetryEvent], object] | None = None,
    ) -> T:
        """``run`` from its second attempt on: the caller made the first attempt itself
        (started at ``self.clock()`` time ``started``), which failed with the retryable
        ``first_error``.  For callers on a hot path that save the frames of ``run``."""
        deadline = started + self.max_total_s

        def give_up(attempt: int, error: BaseException) -> bool:
            """After failed attempt number ``attempt`` (1-based): stop now?"""
            if attempt >= self.max_attempts:
                return True
            remaining = deadline - self.clock()
            after = retry_after_of(error)
            return remaining <= 0 or (after is not None and after > remaining)

        def pause(attempt: int, error: BaseException) -> float:
            backoff = max(self.backoff(attempt), retry_after_of(error) or 0)
            return max(0.0, min(backoff, deadline - self.clock()))

        def announce(event: RetryEvent) -> None:
            log.debug(
                "retrying in %.2fs after attempt %d: %r", event.wait_s, event.attempt, event.error
            )
            if on_retry is not None:
                on_retry(event)

        if give_up(1, first_error):
            raise first_error
        first_wait = pause(1, first_error)
        announce(RetryEvent(1, first_error, first_wait))
        del first_error
        await self.sleep(first_wait)

        # Attempts 2.. under tenacity; its attempt numbers count from 1 again.
        def stop(state: RetryCallState) -> bool:
            return give_up(state.attempt_number + 1, _error(state))

        def wait(state: RetryCallState) -> float:
            return pause(state.attempt_number + 1, _error(state))

        def before_sleep(state: RetryCallState) -> None:
            announce(RetryEvent(state.attempt_number + 1, _error(state), state.upcoming_sleep))

        async def attempt() -> T:
            return await fn()

        retrying = AsyncRetrying(
            sleep=self.sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        return cast(T, await retrying(attempt))


def _error(state: RetryCallState) -> BaseException:
    assert state.outcome is not None
    exc = state.outcome.exception()
    assert exc is not None
    return exc
