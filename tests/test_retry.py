"""RetryPolicy: what is retried, how long it waits, when it gives up, what it raises."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from tenacity import RetryError

from ensemble_async.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectError,
    OverloadedError,
    RateLimitedError,
    RequestTimeoutError,
    ServerError,
)
from ensemble_async.retry import RetryEvent, RetryPolicy, attempt_timeout, is_retryable


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def policy(t: FakeTime, **kw: Any) -> RetryPolicy:
    kw.setdefault("jitter", 0.0)
    return RetryPolicy(sleep=t.sleep, clock=t.clock, **kw)


class Script:
    """An attempt function that raises the scripted errors in turn, then returns "ok"."""

    def __init__(
        self, errors: Sequence[BaseException], *, t: FakeTime | None = None, cost: float = 0
    ) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.raised: list[BaseException] = []
        self._t = t
        self._cost = cost

    async def __call__(self) -> str:
        self.calls += 1
        if self._t is not None:
            self._t.now += self._cost
        await asyncio.sleep(0)
        if self.errors:
            exc = self.errors.pop(0)
            self.raised.append(exc)
            raise exc
        return "ok"


def test_only_retryable_errors_are_retryable() -> None:
    assert is_retryable(ServerError("x"))
    assert is_retryable(RateLimitedError("x"))
    assert not is_retryable(BadRequestError("x"))
    assert not is_retryable(ValueError("x"))
    assert not is_retryable(asyncio.CancelledError())


async def test_succeeds_after_retryable_failures_and_reports_each_retry() -> None:
    t = FakeTime()
    fn = Script([ServerError("boom"), ConnectError("refused")])
    events: list[RetryEvent] = []
    assert await policy(t).run(fn, on_retry=events.append) == "ok"
    assert fn.calls == 3
    assert [e.attempt for e in events] == [1, 2]
    assert [type(e.error) for e in events] == [ServerError, ConnectError]
    assert [e.wait_s for e in events] == t.sleeps == [0.5, 1.0]


async def test_exponential_backoff_is_capped_and_last_error_reraised() -> None:
    t = FakeTime()
    errors = [ServerError(f"boom {i}") for i in range(6)]
    fn = Script(errors)
    with pytest.raises(ServerError) as caught:
        await policy(t, max_attempts=6, initial_backoff_s=1, max_backoff_s=5).run(fn)
    assert caught.value is fn.raised[-1]
    assert not isinstance(caught.value, RetryError)
    assert fn.calls == 6
    assert t.sleeps == [1, 2, 4, 5, 5]


@pytest.mark.parametrize(
    "error", [BadRequestError("bad"), AuthenticationError("who"), ValueError("bug")]
)
async def test_non_retryable_errors_are_raised_at_once(error: Exception) -> None:
    t = FakeTime()
    fn = Script([error])
    with pytest.raises(type(error)) as caught:
        await policy(t).run(fn)
    assert caught.value is error
    assert fn.calls == 1
    assert t.sleeps == []


async def test_retry_after_is_a_floor_for_the_wait() -> None:
    t = FakeTime()
    fn = Script([RateLimitedError("429", retry_after=7), OverloadedError("503", retry_after=0.1)])
    assert await policy(t).run(fn) == "ok"
    assert t.sleeps == [7, 1.0]  # max(0.5, 7), then max(1.0, 0.1)


async def test_gives_up_at_once_when_retry_after_exceeds_the_budget() -> None:
    t = FakeTime()
    fn = Script([RateLimitedError("429", retry_after=30)])
    with pytest.raises(RateLimitedError):
        await policy(t, max_total_s=10).run(fn)
    assert fn.calls == 1
    assert t.sleeps == []


async def test_total_time_bounds_retries() -> None:
    t = FakeTime()
    fn = Script([ServerError(str(i)) for i in range(100)], t=t, cost=4)
    with pytest.raises(ServerError):
        await policy(t, max_attempts=100, max_total_s=10, initial_backoff_s=1).run(fn)
    # t=4 fail, wait 1; t=9 fail, wait min(2, 1 left); t=14 fail: past the deadline.
    assert fn.calls == 3
    assert t.sleeps == [1, 1]


async def test_single_attempt_policy_never_retries() -> None:
    fn = Script([ServerError("x")])
    with pytest.raises(ServerError):
        await RetryPolicy.never().run(fn)
    assert fn.calls == 1


async def test_seeded_full_jitter_is_deterministic_and_bounded() -> None:
    def waits(seed: int) -> list[float]:
        p = RetryPolicy(jitter=1.0, rng=random.Random(seed), initial_backoff_s=1, max_backoff_s=8)
        return [p.backoff(k) for k in range(1, 7)]

    first = waits(3)
    assert first == waits(3)
    assert first != waits(4)
    for k, w in enumerate(first, start=1):
        assert 0 < w <= min(8, 2 ** (k - 1))


async def test_partial_jitter_keeps_a_floor() -> None:
    p = RetryPolicy(jitter=0.25, rng=random.Random(1), initial_backoff_s=4, max_backoff_s=4)
    assert all(3 <= p.backoff(1) <= 4 for _ in range(50))


async def test_attempt_timeout_is_retryable() -> None:
    calls = 0
    never = asyncio.Event()

    async def hang() -> str:
        nonlocal calls
        calls += 1
        async with attempt_timeout(0.001):  # callers time their own attempts
            await never.wait()
        return "never"

    t = FakeTime()
    # The policy's attempt_timeout_s is a setting for Member; run() itself never times.
    with pytest.raises(RequestTimeoutError):
        await policy(t, max_attempts=2, attempt_timeout_s=3600).run(hang)
    assert calls == 2
    assert t.sleeps == [0.5]


async def test_attempt_timeout_passes_foreign_timeouts_through() -> None:
    with pytest.raises(TimeoutError) as caught:
        async with attempt_timeout(60):
            raise TimeoutError("someone else's")
    assert not isinstance(caught.value, RequestTimeoutError)
    async with attempt_timeout(None):
        pass


async def test_cancellation_during_backoff_stops_retrying() -> None:
    sleeping = asyncio.Event()

    async def stuck(seconds: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    fn = Script([ServerError("x")] * 3)
    task = asyncio.create_task(RetryPolicy(sleep=stuck).run(fn))
    await sleeping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fn.calls == 1


async def test_cancellation_inside_an_attempt_is_not_retried() -> None:
    started = asyncio.Event()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(RetryPolicy().run(slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


def test_policy_validates() -> None:
    bad: list[Callable[[], Any]] = [
        lambda: RetryPolicy(max_attempts=0),
        lambda: RetryPolicy(jitter=2),
        lambda: RetryPolicy(initial_backoff_s=5, max_backoff_s=1),
        lambda: RetryPolicy(attempt_timeout_s=0),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


async def test_policy_is_reusable_concurrently() -> None:
    t = FakeTime()
    p = policy(t)
    fns = [Script([ServerError("x")] * i) for i in range(4)]
    calls: list[Awaitable[str]] = [p.run(f) for f in fns]
    assert await asyncio.gather(*calls) == ["ok"] * 4
    assert [f.calls for f in fns] == [1, 2, 3, 4]
