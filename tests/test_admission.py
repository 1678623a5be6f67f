"""Admission control: the FIFO slot pool, AIMD adaptation, token buckets."""

from __future__ import annotations

import asyncio
import random

import pytest

from ensemble_async.admission import (
    AdaptiveLimiter,
    GlobalLimit,
    Outcome,
    TokenBucket,
    classify,
    estimate_tokens,
    used_tokens,
)
from ensemble_async.errors import (
    BadRequestError,
    ConnectError,
    OverloadedError,
    RateLimitedError,
    RequestTimeoutError,
    ServerError,
)
from ensemble_async.types import ChatMessage, Completion, GenerationRequest


async def settle(rounds: int = 5) -> None:
    """Let the other tasks run up to their next real wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run_window(limiter: GlobalLimit, count: int, error: BaseException | None = None) -> None:
    """``count`` tasks take a slot each, wait until all hold one, then end together
    (successfully, or all with ``error``)."""
    go = asyncio.Event()

    async def one() -> None:
        async with limiter.slot():
            await go.wait()
            if error is not None:
                raise error

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await settle()
    assert limiter.in_flight == count
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is error for r in results)


def test_classify() -> None:
    assert classify(None) is Outcome.SUCCESS
    for exc in (RateLimitedError("x"), OverloadedError("x"), RequestTimeoutError("x")):
        assert classify(exc) is Outcome.OVERLOAD
    for other in (BadRequestError("x"), ConnectError("x"), ServerError("x"), ValueError()):
        assert classify(other) is Outcome.IGNORE
    assert classify(asyncio.CancelledError()) is Outcome.IGNORE


def test_limiter_validates_bounds() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(10, maximum=5)
    with pytest.raises(ValueError):
        AdaptiveLimiter(2, minimum=3, maximum=5)
    with pytest.raises(ValueError):
        GlobalLimit(0)


async def test_additive_increase_one_per_full_window() -> None:
    limiter = AdaptiveLimiter(2, maximum=10)
    await run_window(limiter, 2)
    assert limiter.limit == 3
    await run_window(limiter, 3)
    assert limiter.limit == 4
    assert limiter.increases == 2


async def test_increase_stops_at_maximum() -> None:
    limiter = AdaptiveLimiter(2, maximum=3)
    for _ in range(4):
        await run_window(limiter, limiter.limit)
    assert limiter.limit == 3


async def test_no_increase_while_the_limit_is_not_used() -> None:
    limiter = AdaptiveLimiter(4, maximum=10)
    for _ in range(20):  # one at a time: the window never fills the limit
        async with limiter.slot():
            pass
    assert limiter.limit == 4
    assert limiter.increases == 0


async def test_burst_of_429s_from_one_window_halves_once() -> None:
    limiter = AdaptiveLimiter(16, maximum=16)
    await run_window(limiter, 16, RateLimitedError("slow down"))
    assert limiter.limit == 8
    assert limiter.decreases == 1
    # The next window's requests were admitted after the decrease: they count again.
    await run_window(limiter, 8, OverloadedError("busy"))
    assert limiter.limit == 4
    assert limiter.decreases == 2


async def test_decrease_floors_at_minimum() -> None:
    limiter = AdaptiveLimiter(4, minimum=3, maximum=8)
    await run_window(limiter, 4, RequestTimeoutError("slow"))
    assert limiter.limit == 3
    await run_window(limiter, 3, RequestTimeoutError("slow"))
    assert limiter.limit == 3


async def test_fatal_and_connection_errors_do_not_change_the_limit() -> None:
    limiter = AdaptiveLimiter(4, maximum=8)
    await run_window(limiter, 4, BadRequestError("bad"))
    await run_window(limiter, 4, ConnectError("refused"))
    assert limiter.limit == 4


async def test_old_window_success_does_not_count_after_a_decrease() -> None:
    limiter = AdaptiveLimiter(4, maximum=8)
    go = asyncio.Event()
    fail = asyncio.Event()

    async def ok() -> None:
        async with limiter.slot():
            await go.wait()

    async def overloaded() -> None:
        async with limiter.slot():
            await fail.wait()
            raise RateLimitedError("429")

    slow = [asyncio.create_task(ok()) for _ in range(3)]
    bad = asyncio.create_task(overloaded())
    await settle()
    fail.set()
    with pytest.raises(RateLimitedError):
        await bad
    assert limiter.limit == 2
    go.set()
    await asyncio.gather(*slow)
    # Three successes from before the decrease would otherwise complete a window of 2.
    assert limiter.limit == 2
    assert limiter.increases == 0


async def test_fixed_limit_never_exceeded_by_200_tasks() -> None:
    limiter = GlobalLimit(7)
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        async with limiter.slot():
            peak = max(peak, limiter.in_flight)
            assert limiter.in_flight <= 7
            for _ in range(i % 4):
                await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(200)))
    assert peak == 7
    assert limiter.in_flight == 0
    assert limiter.waiting == 0


async def test_adaptive_limit_respected_while_it_moves() -> None:
    limiter = AdaptiveLimiter(8, minimum=2, maximum=20)
    rng = random.Random(5)
    seen_limits: set[int] = set()

    async def one() -> None:
        async with limiter.slot():
            assert limiter.in_flight <= limiter.limit
            seen_limits.add(limiter.limit)
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            if rng.random() < 0.05:
                raise RateLimitedError("429")

    results = await asyncio.gather(*(one() for _ in range(200)), return_exceptions=True)
    assert any(isinstance(r, RateLimitedError) for r in results)
    assert len(seen_limits) > 1  # the limit did move
    assert limiter.in_flight == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    limiter = GlobalLimit(1)
    order: list[int] = []
    gate = limiter.slot()
    await gate.__aenter__()

    async def one(i: int) -> None:
        async with limiter.slot():
            order.append(i)
            await asyncio.sleep(0)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)
    assert limiter.waiting == 10
    await gate.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order == list(range(10))


async def test_cancelled_waiter_leaves_the_queue() -> None:
    limiter = GlobalLimit(1)
    gate = limiter.slot()
    await gate.__aenter__()
    entered: list[str] = []

    async def one(tag: str) -> None:
        async with limiter.slot():
            entered.append(tag)

    a = asyncio.create_task(one("a"))
    b = asyncio.create_task(one("b"))
    await settle()
    assert limiter.waiting == 2
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    assert limiter.waiting == 1
    await gate.__aexit__(None, None, None)
    await b
    assert entered == ["b"]
    assert limiter.in_flight == 0


async def test_waiter_cancelled_right_after_the_handover_gives_the_slot_back() -> None:
    limiter = GlobalLimit(1)
    gate = limiter.slot()
    await gate.__aenter__()
    entered = asyncio.Event()

    async def waiter() -> None:
        async with limiter.slot():
            entered.set()

    task = asyncio.create_task(waiter())
    await settle()
    await gate.__aexit__(None, None, None)  # hands the slot to the waiter...
    assert limiter.in_flight == 1
    task.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not entered.is_set()
    assert limiter.in_flight == 0
    async with limiter.slot():
        assert limiter.in_flight == 1


async def test_cancelled_holder_releases_its_slot() -> None:
    limiter = AdaptiveLimiter(2, maximum=4)
    hold = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot():
            await hold.wait()

    task = asyncio.create_task(holder())
    await settle()
    assert limiter.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.in_flight == 0
    assert limiter.limit == 2


async def test_set_maximum_clamps_the_limit() -> None:
    limiter = AdaptiveLimiter(8, maximum=16)
    limiter.set_maximum(4)
    assert (limiter.limit, limiter.maximum) == (4, 4)
    limiter.set_maximum(32)
    assert (limiter.limit, limiter.maximum) == (4, 32)


# -- token buckets ----------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def bucket(rate: float, burst: float | None = None) -> tuple[TokenBucket, FakeTime]:
    t = FakeTime()
    return TokenBucket(rate, burst=burst, clock=t.clock, sleep=t.sleep), t


async def test_bucket_serves_the_burst_then_waits_at_the_rate() -> None:
    b, t = bucket(60, burst=3)  # 1 per second
    for _ in range(3):
        await b.acquire()
    assert t.sleeps == []
    await b.acquire()
    await b.acquire()
    assert t.sleeps == pytest.approx([1.0, 1.0])
    assert t.now == pytest.approx(2.0)


async def test_bucket_refills_with_time_up_to_the_burst() -> None:
    b, t = bucket(120, burst=4)  # 2 per second
    await b.acquire(4)
    assert b.available == pytest.approx(0)
    t.now += 1.0
    assert b.available == pytest.approx(2)
    t.now += 100.0
    assert b.available == pytest.approx(4)


async def test_amount_above_burst_waits_proportionally() -> None:
    b, t = bucket(600, burst=5)  # 10 per second
    await b.acquire(5)
    await b.acquire(20)  # waits for a full bucket (0.5 s), then owes 15
    assert t.sleeps == pytest.approx([0.5])
    assert b.available == pytest.approx(-15)
    await b.acquire(1)  # must repay the debt first: 1.6 s
    assert t.sleeps == pytest.approx([0.5, 1.6])


async def test_bucket_long_run_rate_matches() -> None:
    b, t = bucket(300, burst=1)  # 5 per second
    for _ in range(51):
        await b.acquire()
    assert t.now == pytest.approx(10.0)


async def test_bucket_waiters_are_fifo() -> None:
    b, t = bucket(60, burst=1)
    await b.acquire()
    order: list[int] = []

    async def one(i: int) -> None:
        await b.acquire()
        order.append(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert t.now == pytest.approx(6.0)


async def test_cancelled_acquire_takes_nothing() -> None:
    blocked = asyncio.Event()
    t = FakeTime()

    async def stuck_sleep(seconds: float) -> None:
        blocked.set()
        await asyncio.Event().wait()

    b = TokenBucket(60, burst=2, clock=t.clock, sleep=stuck_sleep)
    await b.acquire(2)
    t.now += 1.0  # one unit back
    task = asyncio.create_task(b.acquire(2))
    await blocked.wait()
    assert b.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.waiting == 0
    assert b.available == pytest.approx(1)
    await b.acquire(1)  # the lock is free again


async def test_charge_and_refund_correct_an_estimate() -> None:
    b, _ = bucket(6000, burst=1000)
    await b.acquire(300)
    b.charge(50)
    assert b.available == pytest.approx(650)
    b.refund(500)
    assert b.available == pytest.approx(1000)  # capped at the burst


def test_default_burst_is_ten_seconds_of_rate() -> None:
    assert TokenBucket(600).burst == 100
    assert TokenBucket(3).burst == 1


def test_estimate_and_used_tokens() -> None:
    request = GenerationRequest(prompt="x" * 41, max_new_tokens=10, n=3)
    assert estimate_tokens(request) == 11 + 30
    chat = GenerationRequest(
        messages=(ChatMessage("system", "abcd"), ChatMessage("user", "efgh")), max_new_tokens=5
    )
    assert estimate_tokens(chat) == 2 + 5
    done = [
        Completion("a", "stop", "b", 0.1, prompt_tokens=12, completion_tokens=4, index=0),
        Completion("b", "stop", "b", 0.1, prompt_tokens=12, completion_tokens=7, index=1),
        Completion("c", "length", "b", 0.1, index=2),
    ]
    assert used_tokens(request, done) == 12 + 4 + 7 + 10
    unknown = [Completion("a", "stop", "b", 0.1)]
    assert used_tokens(request.replace(n=1), unknown) == 11 + 10
