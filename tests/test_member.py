"""Member (admission + retries + breaker + stats around a Backend), and BackendStats."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ensemble_async.admission import AdaptiveLimiter, GlobalLimit, TokenBucket
from ensemble_async.backend import Backend, BaseBackend
from ensemble_async.breaker import CircuitBreaker, CircuitOpenError
from ensemble_async.errors import (
    BadRequestError,
    RateLimitedError,
    RequestTimeoutError,
    ServerError,
)
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.stats import BackendStats, RateWindow, Reservoir, percentile
from ensemble_async.types import (
    BackendInfo,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)

REQUEST = GenerationRequest(prompt="p" * 40, max_new_tokens=20)


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read fresh (a plain function so mypy does not narrow it)."""
    return str(breaker.state)


class FakeBackend(BaseBackend):
    """Answers from a script: each call pops the next error (None = succeed).

    ``gate`` (when set) makes every call wait for it, so tests control timing.
    """

    kind = "fake"

    def __init__(
        self,
        script: list[BaseException | None] | None = None,
        *,
        always: BaseException | None = None,
        gate: asyncio.Event | None = None,
        max_concurrency: int | None = None,
        name: str = "fake",
    ) -> None:
        super().__init__(name=name)
        self.script = list(script or [])
        self.always = always
        self.gate = gate
        self.max_concurrency = max_concurrency
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.cancelled = 0
        self.closed = False
        self.started = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            error = self.script.pop(0) if self.script else self.always
            if error is not None:
                raise error
            return [
                Completion(
                    f"text {i}",
                    "stop",
                    self.name,
                    0.01,
                    prompt_tokens=10,
                    completion_tokens=3,
                    index=i,
                )
                for i in range(request.n)
            ]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def health(self) -> Health:
        return Health(ok=True, latency_s=0.0)

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, kind=self.kind, max_concurrency=self.max_concurrency)

    async def aclose(self) -> None:
        self.closed = True


class Waits:
    """A retry sleep that records waits and returns at once (optionally gated)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.gate: asyncio.Event | None = None
        self.sleeping = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.sleeping.set()
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)


def quick_retry(waits: Waits, **kw: Any) -> RetryPolicy:
    kw.setdefault("jitter", 0.0)
    return RetryPolicy(sleep=waits, **kw)


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_fake_backend_is_a_backend() -> None:
    assert isinstance(FakeBackend(), Backend)


async def test_flaky_backend_succeeds_after_k_failures() -> None:
    backend = FakeBackend([ServerError("boom"), RateLimitedError("429", retry_after=2), None])
    waits = Waits()
    member = Member(backend, retry=quick_retry(waits))
    completions = await member.generate(REQUEST.replace(n=2))
    assert [c.index for c in completions] == [0, 1]
    assert backend.calls == 3
    assert waits.waits == [0.5, 2]
    s = member.stats
    assert (s.done, s.failed, s.retried, s.in_flight) == (1, 0, 2, 0)
    assert s.errors == {"ServerError": 1, "RateLimitedError": 1}
    assert s.completions == 2
    assert (s.prompt_tokens, s.completion_tokens) == (10, 6)


async def test_always_failing_backend_opens_the_breaker_and_then_fails_fast() -> None:
    backend = FakeBackend(always=ServerError("down"))
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=60, clock=lambda: now[0])
    member = Member(backend, retry=quick_retry(Waits(), max_attempts=3), breaker=breaker)
    for _ in range(2):
        with pytest.raises(ServerError):
            await member.generate(REQUEST)
    assert backend.calls == 6
    assert state(breaker) == "open"
    with pytest.raises(CircuitOpenError):
        await member.generate(REQUEST)
    assert backend.calls == 6  # not even tried
    snap = member.snapshot()
    assert snap["breaker"] == "open"
    assert snap["failed"] == 3
    assert snap["errors"] == {"ServerError": 6, "CircuitOpenError": 1}
    assert member.stats.breaker_state == "open"

    # Later the backend recovers: the half-open probe goes through and closes it.
    backend.always = None
    now[0] += 60
    assert len(await member.generate(REQUEST)) == 1
    assert state(breaker) == "closed"
    assert backend.calls == 7


async def test_fatal_errors_are_not_retried_and_do_not_trip_the_breaker() -> None:
    backend = FakeBackend(always=BadRequestError("bad"))
    waits = Waits()
    member = Member(backend, retry=quick_retry(waits), breaker=CircuitBreaker(failure_threshold=1))
    for _ in range(3):
        with pytest.raises(BadRequestError):
            await member.generate(REQUEST)
    assert backend.calls == 3
    assert waits.waits == []
    assert state(member.breaker) == "closed"
    assert member.stats.retried == 0


async def test_member_concurrency_limit_holds() -> None:
    gate = asyncio.Event()
    backend = FakeBackend(gate=gate)
    member = Member(backend, concurrency=4)
    tasks = [asyncio.create_task(member.generate(REQUEST)) for _ in range(50)]
    await settle()
    assert backend.active == 4
    assert member.limiter.waiting == 46
    assert member.stats.in_flight == 50
    gate.set()
    await asyncio.gather(*tasks)
    assert backend.peak == 4
    assert member.stats.done == 50


async def test_global_limit_is_shared_by_members() -> None:
    gate = asyncio.Event()
    shared = GlobalLimit(3)
    a, b = FakeBackend(gate=gate, name="a"), FakeBackend(gate=gate, name="b")
    members = [Member(a, concurrency=4, global_limit=shared), Member(b, global_limit=shared)]
    tasks = [asyncio.create_task(m.generate(REQUEST)) for m in members for _ in range(5)]
    await settle()
    assert a.active + b.active == 3
    assert shared.in_flight == 3
    gate.set()
    await asyncio.gather(*tasks)
    assert a.calls == b.calls == 5
    assert shared.in_flight == 0


async def test_backoff_does_not_hold_a_slot() -> None:
    backend = FakeBackend([ServerError("once")])
    waits = Waits()
    waits.gate = asyncio.Event()
    member = Member(backend, concurrency=1, retry=quick_retry(waits))
    first = asyncio.create_task(member.generate(REQUEST))
    await waits.sleeping.wait()  # the first request is backing off...
    assert member.limiter.in_flight == 0
    assert len(await member.generate(REQUEST)) == 1  # ...while another one gets through
    waits.gate.set()
    assert len(await first) == 1
    assert backend.calls == 3


async def test_cancelling_generate_cancels_the_call_and_frees_every_slot() -> None:
    gate = asyncio.Event()
    backend = FakeBackend(gate=gate)
    shared = GlobalLimit(5)
    member = Member(backend, concurrency=1, global_limit=shared)
    running = asyncio.create_task(member.generate(REQUEST))
    queued = asyncio.create_task(member.generate(REQUEST))
    await backend.started.wait()
    await settle()
    assert member.limiter.waiting == 1
    running.cancel()
    queued.cancel()
    for task in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert backend.cancelled == 1
    assert backend.active == 0
    assert (member.limiter.in_flight, member.limiter.waiting, shared.in_flight) == (0, 0, 0)
    assert (member.stats.in_flight, member.stats.cancelled, member.stats.failed) == (0, 2, 0)
    assert state(member.breaker) == "closed"
    gate.set()
    assert len(await member.generate(REQUEST)) == 1


@pytest.mark.parametrize(
    "limits",
    [{}, {"rpm": 1e6}, {"tpm": 1e9}, {"global": 4}],
    ids=["member-slot-only", "rpm", "tpm", "global-limit"],
)
async def test_attempt_timeout_covers_the_backend_call_and_shrinks_the_limit(
    limits: dict[str, float],
) -> None:
    """The same on the short path (only the member's slot) and the full one."""
    backend = FakeBackend(gate=asyncio.Event())  # never answers
    shared = GlobalLimit(int(limits["global"])) if "global" in limits else None
    member = Member(
        backend,
        concurrency=AdaptiveLimiter(4, maximum=8),
        timeout_s=0.001,
        retry=RetryPolicy.never(),
        rpm=limits.get("rpm"),
        tpm=limits.get("tpm"),
        global_limit=shared,
    )
    with pytest.raises(RequestTimeoutError):
        await member.generate(REQUEST)
    assert backend.cancelled == 1
    assert member.limiter.limit == 2
    assert member.limiter.in_flight == 0
    assert shared is None or shared.in_flight == 0
    assert member.stats.errors == {"RequestTimeoutError": 1}
    assert member.stats.in_flight == 0


async def test_policy_attempt_timeout_is_applied_to_the_backend_call_only() -> None:
    limit = GlobalLimit(1)
    member = Member(FakeBackend(), retry=RetryPolicy(attempt_timeout_s=0.05), global_limit=limit)
    assert member.timeout_s == 0.05
    async with limit.slot():  # admission is held well past the attempt timeout
        task = asyncio.create_task(member.generate(REQUEST))
        await asyncio.sleep(0.15)  # time passing, not synchronisation
        assert not task.done()
    assert len(await task) == 1  # the wait for the slot was not timed
    assert member.stats.errors == {}


async def test_start_reads_the_servers_max_concurrency() -> None:
    auto = Member(FakeBackend(max_concurrency=32), concurrency=8)
    await auto.start()
    assert (auto.limiter.limit, auto.limiter.maximum) == (8, 32)
    capped = Member(FakeBackend(max_concurrency=32), concurrency=8, max_concurrency=16)
    await capped.start()
    assert capped.limiter.maximum == 16
    small = Member(FakeBackend(max_concurrency=2), concurrency=8)
    await small.start()
    assert (small.limiter.limit, small.limiter.maximum) == (2, 2)
    unknown = Member(FakeBackend(), concurrency=8)
    await unknown.start()
    assert unknown.limiter.maximum == 8


async def test_start_is_bounded_when_the_server_never_answers_its_info() -> None:
    class Hanging(FakeBackend):
        async def info(self) -> BackendInfo:
            await asyncio.Event().wait()  # accepts, never answers
            raise AssertionError("unreachable")

    member = Member(Hanging(max_concurrency=64), concurrency=8, timeout_s=0.05)
    await asyncio.wait_for(member.start(), 10)  # gives up on the facts, not on the member
    assert member.limiter.maximum == 8
    (done,) = await member.generate(GenerationRequest(prompt="p"))
    assert done.text == "text 0"


async def test_context_manager_starts_and_closes_the_backend() -> None:
    backend = FakeBackend(max_concurrency=12)
    async with Member(backend, name="m1") as member:
        assert member.name == "m1"
        assert member.limiter.maximum == 12
        assert not backend.closed
    assert backend.closed


async def test_rate_buckets_are_charged_per_attempt_and_corrected() -> None:
    now = [0.0]
    rpm = TokenBucket(60, burst=10, clock=lambda: now[0])
    tpm = TokenBucket(60_000, burst=1000, clock=lambda: now[0])
    backend = FakeBackend([ServerError("once")])
    member = Member(backend, rpm=rpm, tpm=tpm, retry=quick_retry(Waits()))
    await member.generate(REQUEST)  # estimate 10 + 20 per attempt; actual usage 10 + 3
    assert rpm.available == pytest.approx(8)
    assert tpm.available == pytest.approx(1000 - 30 - 13)


async def test_snapshot_is_json_ready() -> None:
    member = Member(FakeBackend([ServerError("x")]), retry=quick_retry(Waits()))
    await member.generate(REQUEST)
    snap = json.loads(json.dumps(member.snapshot()))
    assert snap["done"] == 1
    assert snap["retried"] == 1
    assert snap["limit"] == 8
    assert snap["latency_s"]["samples"] == 1


async def test_tgi_429_with_retry_after_then_success() -> None:
    tgi = pytest.importorskip("ensemble_async.backends.tgi")
    double_mod = pytest.importorskip("ensemble_async.testing.tgi_double")
    from ensemble_async.testing.faults import Fault

    waits = Waits()
    async with double_mod.TGIDouble() as double:
        double.faults.push(Fault.status(429, retry_after=3))
        async with Member(tgi.TGIBackend(double.url), retry=quick_retry(waits)) as member:
            completions = await member.generate(GenerationRequest(prompt="hello there"))
    assert len(completions) == 1
    assert completions[0].text
    assert member.stats.retried == 1
    assert member.stats.errors == {"RateLimitedError": 1}
    assert waits.waits == [3]  # the server's Retry-After, above the 0.5 s backoff
    assert double.stats.requests == 2


# -- stats ------------------------------------------------------------------------------


def test_percentiles_on_known_data() -> None:
    data = [float(x) for x in range(1, 101)]
    reservoir = Reservoir(size=1000)
    for x in reversed(data):
        reservoir.add(x)
    p50, p95, p99 = reservoir.percentiles(50, 95, 99)
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    assert p50 == pytest.approx(cuts[49])
    assert p95 == pytest.approx(cuts[94])
    assert p99 == pytest.approx(cuts[98])
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0


def test_reservoir_memory_is_bounded_and_still_representative() -> None:
    reservoir = Reservoir(size=512, seed=1)
    for i in range(100_000):
        reservoir.add(i / 100_000)
        if i == 1000:
            assert len(reservoir) == 512
    assert len(reservoir) == 512
    assert reservoir.count == 100_000
    p50, p95 = reservoir.percentiles(50, 95)
    assert p50 == pytest.approx(0.5, abs=0.06)
    assert p95 == pytest.approx(0.95, abs=0.03)


def test_rate_window_counts_only_recent_seconds() -> None:
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    window = RateWindow(10, clock=clock)
    for _ in range(20):
        window.add(1, tokens=5)
    now[0] = 4.5
    window.add(2, tokens=10)
    requests, tokens = window.rates()
    assert requests == pytest.approx(22 / 4.5)
    assert tokens == pytest.approx(110 / 4.5)
    now[0] = 13.0  # the burst at t=0 has left the window
    assert window.rates() == pytest.approx((0.2, 1.0))
    for t in range(1000):
        now[0] = 20.0 + t
        window.add()
    assert len(window._buckets) <= 11


def test_backend_stats_counts() -> None:
    stats = BackendStats("b")
    for _ in range(3):
        stats.started()
    stats.succeeded(0.2, completions=2, prompt_tokens=7, completion_tokens=9)
    stats.retrying_after(ServerError("x"))
    stats.failed_with(BadRequestError("y"))
    stats.was_cancelled()
    snap = stats.snapshot()
    assert snap["in_flight"] == 0
    assert (snap["done"], snap["failed"], snap["cancelled"], snap["retried"]) == (1, 1, 1, 1)
    assert snap["errors"] == {"ServerError": 1, "BadRequestError": 1}
    assert (snap["prompt_tokens"], snap["completion_tokens"]) == (7, 9)
    assert snap["latency_s"]["p50"] == pytest.approx(0.2)
    json.dumps(snap)


def test_member_validates_its_bounds() -> None:
    with pytest.raises(ValueError):
        Member(FakeBackend(), concurrency=8, max_concurrency=4)
    with pytest.raises(ValueError):
        Member(FakeBackend(), weight=0)


# ------------------------------------------------------------------ caller's objects


async def test_a_callers_breaker_is_used_but_not_changed() -> None:
    seen: list[tuple[str, str]] = []

    def mine(old: object, new: object) -> None:
        seen.append((str(old), str(new)))

    breaker = CircuitBreaker(failure_threshold=1, on_change=mine)
    member = Member(
        FakeBackend(always=ServerError("down")), retry=RetryPolicy.never(), breaker=breaker
    )
    with pytest.raises(ServerError):
        await member.generate(REQUEST)
    assert breaker.on_change is mine
    assert breaker.name is None
    assert seen == [("closed", "open")]
    assert member.stats.breaker_state == "open"  # the member follows it on its own
    with pytest.raises(CircuitOpenError) as caught:
        await member.generate(REQUEST)
    assert caught.value.backend == "fake"  # the member names itself in the error


# ---------------------------------------------------------------------------- streams


class StreamFake(BaseBackend):
    """Streams from a script: each attempt pops a plan -- an error raised before the first
    event, or a list of events where an exception stands for a failure at that point.
    ``gate`` (when set) is awaited before each event after the first."""

    kind = "streamer"

    def __init__(self, plans: list[BaseException | list[StreamEvent | BaseException]]) -> None:
        super().__init__(name="s")
        self.plans = plans
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.closed_streams = 0

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        raise AssertionError("streams only")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.calls += 1
        plan = self.plans.pop(0)
        try:
            if isinstance(plan, BaseException):
                raise plan
            for k, event in enumerate(plan):
                if k and self.gate is not None:
                    await self.gate.wait()
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            self.closed_streams += 1


def done(text: str = "hi") -> Completion:
    return Completion(text, "stop", "s", 0.01, prompt_tokens=4, completion_tokens=2)


async def test_stream_yields_deltas_then_the_completion_and_counts_it() -> None:
    backend = StreamFake([[TextDelta("h"), TextDelta("i"), done()]])
    member = Member(backend, retry=RetryPolicy.never())
    events = [e async for e in member.stream(REQUEST)]
    assert events == [TextDelta("h"), TextDelta("i"), done()]
    snap = member.snapshot()
    assert (snap["done"], snap["failed"], snap["completion_tokens"]) == (1, 0, 2)
    assert member.limiter.in_flight == 0


async def test_stream_retries_only_before_the_first_event() -> None:
    waits = Waits()
    backend = StreamFake(
        [ServerError("boom"), [ServerError("empty 503")], [TextDelta("a"), done("a")]]
    )
    member = Member(backend, retry=quick_retry(waits, max_attempts=5))
    assert [e async for e in member.stream(REQUEST)] == [TextDelta("a"), done("a")]
    assert backend.calls == 3
    assert member.stats.retried == 2

    late = StreamFake([[TextDelta("a"), ServerError("mid-stream")], [done()]])
    member = Member(late, retry=quick_retry(Waits(), max_attempts=5))
    got: list[StreamEvent] = []
    with pytest.raises(ServerError, match="mid-stream"):
        async for event in member.stream(REQUEST):
            got.append(event)
    assert got == [TextDelta("a")]
    assert late.calls == 1  # no retry once a token reached the caller
    assert member.stats.failed == 1
    assert member.limiter.in_flight == 0


async def test_stream_holds_its_slot_until_it_ends_or_is_closed() -> None:
    backend = StreamFake([[TextDelta("a"), done()], [TextDelta("b"), done()]])
    limit = GlobalLimit(1)
    member = Member(backend, concurrency=1, global_limit=limit, retry=RetryPolicy.never())
    events = member.stream(REQUEST)
    assert await anext(events) == TextDelta("a")
    assert (member.limiter.in_flight, limit.in_flight) == (1, 1)
    await events.aclose()  # the caller stops early
    assert (member.limiter.in_flight, limit.in_flight) == (0, 0)
    assert backend.closed_streams == 1
    assert member.stats.cancelled == 1
    assert [e async for e in member.stream(REQUEST)] == [TextDelta("b"), done()]


async def test_stream_timeout_covers_the_whole_stream_and_is_not_retried_late() -> None:
    backend = StreamFake([[TextDelta("a"), done()]])
    backend.gate = asyncio.Event()  # the second event never comes
    member = Member(backend, timeout_s=0.05, retry=quick_retry(Waits(), max_attempts=3))
    got: list[StreamEvent] = []
    with pytest.raises(RequestTimeoutError):
        async for event in member.stream(REQUEST):
            got.append(event)
    assert got == [TextDelta("a")]
    assert backend.calls == 1


async def test_stream_respects_the_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    backend = StreamFake([ServerError("down"), [done()]])
    member = Member(backend, breaker=breaker, retry=RetryPolicy.never())
    with pytest.raises(ServerError):
        [e async for e in member.stream(REQUEST)]
    assert state(breaker) == "open"
    with pytest.raises(CircuitOpenError):
        [e async for e in member.stream(REQUEST)]
    assert backend.calls == 1


class GenerateOnly:
    """The smallest Backend: a name, generate and aclose (no BaseBackend)."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def name(self) -> str:
        return "tiny"

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        self.calls += 1
        return [done("tiny answer")]

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> GenerateOnly:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def test_a_backend_with_only_generate_works_everywhere() -> None:
    backend = GenerateOnly()
    assert isinstance(backend, Backend)
    async with Member(backend, retry=RetryPolicy.never()) as member:  # start() reads info
        assert (await member.generate(REQUEST))[0].text == "tiny answer"
        assert [e async for e in member.stream(REQUEST)] == [done("tiny answer")]
    assert backend.calls == 2
