"""CircuitBreaker state machine, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from ensemble_async.breaker import (
    CircuitBreaker,
    CircuitOpenError,
    Verdict,
    verdict,
)
from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    ConnectError,
    ContextLengthError,
    RateLimitedError,
    ServerError,
)


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read fresh (a plain function so mypy does not narrow it)."""
    return str(breaker.state)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail(breaker: CircuitBreaker, exc: BaseException | None = None) -> None:
    with pytest.raises(type(exc or ServerError("x"))), breaker.guard():
        raise exc or ServerError("x")


def succeed(breaker: CircuitBreaker) -> None:
    with breaker.guard():
        pass


def make(**kw: object) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(clock=clock, **kw), clock  # type: ignore[arg-type]


def test_verdicts() -> None:
    assert verdict(None) is Verdict.SUCCESS
    for exc in (ServerError("x"), ConnectError("x"), RateLimitedError("x"), KeyError("bug")):
        assert verdict(exc) is Verdict.FAILURE
    for exc2 in (BadRequestError("x"), ContextLengthError("x"), asyncio.CancelledError()):
        assert verdict(exc2) is Verdict.NEUTRAL
    assert verdict(CircuitOpenError("open")) is Verdict.NEUTRAL


def test_circuit_open_error_is_a_non_retryable_backend_error() -> None:
    exc = CircuitOpenError("open", backend="b", retry_in=3)
    assert isinstance(exc, BackendError)
    assert not exc.retryable
    assert exc.retry_in == 3


def test_opens_after_threshold_consecutive_failures_and_rejects() -> None:
    breaker, clock = make(failure_threshold=3, reset_timeout_s=30)
    for _ in range(2):
        fail(breaker)
    assert state(breaker) == "closed"
    fail(breaker)
    assert state(breaker) == "open"
    clock.now += 10
    ran = False
    with pytest.raises(CircuitOpenError) as caught, breaker.guard():
        ran = True
    assert not ran
    assert caught.value.retry_in == pytest.approx(20)
    assert breaker.rejected == 1
    assert breaker.transitions == {"closed->open": 1}


def test_success_resets_the_count() -> None:
    breaker, _ = make(failure_threshold=3)
    for _ in range(5):
        fail(breaker)
        fail(breaker)
        succeed(breaker)
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 0


def test_fatal_errors_are_neutral() -> None:
    breaker, _ = make(failure_threshold=3)
    for _ in range(10):
        fail(breaker, BadRequestError("bad prompt"))
    assert state(breaker) == "closed"
    fail(breaker)
    fail(breaker)
    fail(breaker, BadRequestError("bad prompt"))  # does not hide the outage either
    assert breaker.consecutive_failures == 2
    fail(breaker)
    assert state(breaker) == "open"


def test_half_open_probe_success_closes() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout_s=30)
    fail(breaker)
    clock.now += 29.9
    assert state(breaker) == "open"
    clock.now += 0.1
    assert state(breaker) == "half_open"
    succeed(breaker)
    assert state(breaker) == "closed"
    assert breaker.transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_half_open_probe_failure_reopens_for_a_full_timeout() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout_s=30)
    fail(breaker)
    clock.now += 30
    fail(breaker, ConnectError("still down"))
    assert state(breaker) == "open"
    with pytest.raises(CircuitOpenError) as caught, breaker.guard():
        pass
    assert caught.value.retry_in == pytest.approx(30)
    assert breaker.transitions["half_open->open"] == 1


def test_half_open_admits_at_most_half_open_max_probes() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout_s=5, half_open_max=2)
    fail(breaker)
    clock.now += 5
    first, second, third = breaker.guard(), breaker.guard(), breaker.guard()
    first.__enter__()
    second.__enter__()
    with pytest.raises(CircuitOpenError):
        third.__enter__()
    # A neutral probe frees its place without deciding anything.
    second.__exit__(BadRequestError, BadRequestError("bad"), None)
    assert state(breaker) == "half_open"
    third.__enter__()
    third.__exit__(None, None, None)
    assert state(breaker) == "closed"
    # The remaining probe's late failure belongs to the half-open era: ignored.
    first.__exit__(ServerError, ServerError("late"), None)
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 0


def test_results_from_before_a_state_change_are_ignored() -> None:
    breaker, clock = make(failure_threshold=2, reset_timeout_s=10)
    slow = breaker.guard()
    slow.__enter__()  # admitted while closed
    fail(breaker)
    fail(breaker)
    assert state(breaker) == "open"
    slow.__exit__(None, None, None)  # a late success must not close it
    assert state(breaker) == "open"
    clock.now += 10
    assert state(breaker) == "half_open"


def test_cancellation_is_neutral() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout_s=1)
    with pytest.raises(asyncio.CancelledError), breaker.guard():
        raise asyncio.CancelledError
    assert state(breaker) == "closed"
    fail(breaker)
    clock.now += 1
    with pytest.raises(asyncio.CancelledError), breaker.guard():
        raise asyncio.CancelledError
    assert state(breaker) == "half_open"
    succeed(breaker)  # the cancelled probe gave its place back
    assert state(breaker) == "closed"


def test_on_change_hook_sees_every_transition() -> None:
    seen: list[tuple[str, str]] = []
    clock = Clock()
    breaker = CircuitBreaker(
        1, 2, clock=clock, on_change=lambda old, new: seen.append((str(old), str(new)))
    )
    fail(breaker)
    clock.now += 2
    succeed(breaker)
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_validates() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(half_open_max=0)
