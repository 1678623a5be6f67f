"""Reliability at scale: thousands of requests through real HTTP test doubles that fail
on purpose, with every item accounted for.

* ``test_ten_thousand_requests_with_faults``: 10,002 requests (3,334 items x 3 members:
  two TGI doubles and one vLLM-style double) through ``Ensemble.map``; 20% of the
  requests fail with a seeded mix of 429 (with Retry-After), 503, 424, hangs (per-attempt
  timeout), connection resets, malformed JSON and truncated bodies.  No item may be lost
  or duplicated, and the client's counters must match what the doubles saw.
* ``test_streams_recover_from_faults``: the streaming path (``backend.stream()`` under
  ``RetryPolicy.run``) against truncated SSE streams, SSE error events, malformed events,
  resets and 503s.
* ``test_dead_member_trips_its_breaker``: a member that always fails opens its circuit
  breaker; later items record it as ``circuit_open`` and the run ends with the others.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack

from ensemble_async.admission import AdaptiveLimiter
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.breaker import BreakerState, CircuitBreaker
from ensemble_async.ensemble import Ensemble, EnsembleResult
from ensemble_async.errors import BackendError
from ensemble_async.member import Member
from ensemble_async.retry import RetryEvent, RetryPolicy
from ensemble_async.testing.faults import Fault, FaultPlan
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import Completion, GenerationRequest, TextDelta

MAX_NEW_TOKENS = 32


# The non-streaming mix; duplicates weight the draw.  One hang in 13 faults keeps the
# time spent waiting out per-attempt timeouts small.
PLAIN_FAULTS = (
    *[Fault.status(429, retry_after=0.01)] * 2,
    *[Fault.status(503)] * 2,
    *[Fault.status(424)] * 2,
    *[Fault.reset()] * 2,
    *[Fault.malformed()] * 2,
    *[Fault.truncate()] * 2,
    Fault.hang(),
)

# What each injected fault must look like to the client (errors counted by class).
EXPECTED_ERROR = {
    "429": "RateLimitedError",
    "503": "OverloadedError",
    "424": "ServerError",
    "hang": "RequestTimeoutError",
}


def summary_line(
    items: int, injected: Counter[str], retries: int, failed: int, lost: int, dup: int
) -> str:
    kinds = " ".join(f"{k}={v}" for k, v in sorted(injected.items()))
    return (
        f"items={items} requests_faulted={sum(injected.values())} [{kinds}] "
        f"retries={retries} failed_after_retries={failed} lost={lost} dup={dup}"
    )


async def test_ten_thousand_requests_with_faults() -> None:
    items = 3334  # x 3 members = 10,002 requests
    policy = RetryPolicy(
        max_attempts=8,
        initial_backoff_s=0.002,
        max_backoff_s=0.05,
        max_total_s=60.0,
        # Generous against a loaded machine (a normal answer must never time out),
        # short enough that the ~150 hangs cost little: they hold a slot, not the run.
        attempt_timeout_s=2.0,
    )
    plans = [FaultPlan(0.2, PLAIN_FAULTS, seed=s) for s in (11, 12, 13)]
    async with AsyncExitStack() as stack:
        t1 = await stack.enter_async_context(TGIDouble(faults=plans[0]))
        t2 = await stack.enter_async_context(TGIDouble(faults=plans[1]))
        oa = await stack.enter_async_context(OpenAIDouble(faults=plans[2]))

        def member(backend: TGIBackend | OpenAIBackend) -> Member:
            # A fixed limit (no AIMD back-off on the injected 429/503s) and a breaker
            # that cannot open: this test is about retries, not about shedding load.
            return Member(
                backend,
                concurrency=AdaptiveLimiter(32, minimum=32, maximum=32),
                retry=policy,
                breaker=CircuitBreaker(failure_threshold=10**9),
            )

        members = [
            member(TGIBackend(t1.url, name="tgi-1")),
            member(TGIBackend(t2.url, name="tgi-2")),
            member(OpenAIBackend(oa.url, name="vllm", model="double-model")),
        ]
        # "deadline" with a far deadline: every candidate is awaited, none cancelled,
        # so each member sends exactly one (retried) request per item.
        ensemble = await stack.enter_async_context(
            Ensemble(members, policy="deadline", deadline_s=600.0, max_items_in_flight=48)
        )
        prompts = [f"item {i}: write something about number {i}" for i in range(items)]
        request_of = {
            p: GenerationRequest(prompt=p, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
            for p in prompts
        }
        results: list[EnsembleResult] = [
            r async for r in ensemble.map(request_of[p] for p in prompts)
        ]
        snaps = [m.snapshot() for m in members]

    # No item lost, none duplicated, each with one candidate per member.
    seen = [r.index for r in results]
    lost = items - len(set(seen))
    dup = len(seen) - len(set(seen))
    assert lost == 0 and dup == 0
    assert set(seen) == set(range(items))
    for r in results:
        assert [c.source for c in r.candidates] == ["tgi-1", "tgi-2", "vllm"]
        assert all(c.status in ("ok", "unavailable") for c in r.candidates)
        assert all((c.status == "ok") == (c.text is not None) for c in r.candidates)
        # Retries never mix items up: both TGI doubles answer a greedy prompt alike,
        # and exactly as the double's own generator says for that prompt.
        prompt = prompts[r.index]
        expected, _ = t1.complete(prompt, {"max_new_tokens": MAX_NEW_TOKENS})
        for c in r.candidates[:2]:
            if c.status == "ok":
                assert c.text == expected

    # The client's books match the servers'.
    received = [t1.stats.requests, t2.stats.requests, oa.requests]
    injected_total: Counter[str] = Counter()
    for snap, plan, got in zip(snaps, plans, received, strict=True):
        errors = Counter(snap["errors"])
        attempts_failed = sum(errors.values())
        assert snap["done"] + snap["failed"] == items
        assert snap["cancelled"] == 0 and snap["in_flight"] == 0
        assert snap["retried"] > 0
        # Every failed attempt was a retry or a final failure, and the two add up.
        assert attempts_failed == snap["retried"] + snap["failed"]
        # Every request the double received was a success or an injected fault, and
        # every injected fault was seen by the client as one failed attempt.
        assert got == snap["done"] + plan.injected
        assert plan.injected == attempts_failed
        # Fault kinds map onto the right error classes.
        for kind, error in EXPECTED_ERROR.items():
            assert errors[error] == plan.by_kind[kind], (snap["name"], kind, errors)
        # Bodies that are not JSON, cut short or never sent (reset) are malformed
        # answers or connection errors; a cut-off body may read as either.
        broken = plan.by_kind["malformed"] + plan.by_kind["truncate"] + plan.by_kind["reset"]
        assert errors["MalformedResponseError"] + errors["ConnectError"] == broken
        assert errors["MalformedResponseError"] >= plan.by_kind["malformed"]
        assert errors["ConnectError"] >= plan.by_kind["reset"]
        injected_total.update(plan.by_kind)

    total_requests = sum(received)
    assert total_requests >= 3 * items
    # ~20% of requests faulted (seeded draws; a wide band, not a timing assertion).
    assert 0.15 < sum(injected_total.values()) / total_requests < 0.25
    assert all(injected_total[k] > 0 for k in ("429", "503", "424", "hang", "reset"))
    retries = sum(s["retried"] for s in snaps)
    failed = sum(s["failed"] for s in snaps)
    print("\n" + summary_line(items, injected_total, retries, failed, lost, dup))


async def collect(backend: TGIBackend | OpenAIBackend, request: GenerationRequest) -> Completion:
    """One streamed answer: the final completion, checked against its deltas."""
    pieces: list[str] = []
    final: Completion | None = None
    async for event in backend.stream(request):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        elif isinstance(event, Completion):
            final = event
    assert final is not None, "stream ended without a completion and without an error"
    assert "".join(pieces) == final.text
    return final


STREAM_FAULTS = (
    Fault.truncate(),
    Fault.stream_error(),
    Fault.malformed(),
    Fault.reset(),
    Fault.status(503),
)


async def test_streams_recover_from_faults() -> None:
    per_double = 200
    policy = RetryPolicy(max_attempts=8, initial_backoff_s=0.001, max_backoff_s=0.02)
    plans = [FaultPlan(0.3, STREAM_FAULTS, seed=s) for s in (21, 22)]
    async with AsyncExitStack() as stack:
        tgi = await stack.enter_async_context(TGIDouble(faults=plans[0]))
        oa = await stack.enter_async_context(OpenAIDouble(faults=plans[1]))
        backends: list[TGIBackend | OpenAIBackend] = [
            TGIBackend(tgi.url, name="tgi"),
            OpenAIBackend(oa.url, name="vllm", model="double-model"),
        ]
        for b in backends:
            stack.push_async_callback(b.aclose)
        errors: list[Counter[str]] = [Counter(), Counter()]
        gate = asyncio.Semaphore(32)

        async def one(k: int, i: int) -> Completion | BackendError:
            request = GenerationRequest(
                prompt=f"stream {i} about {i % 7}", max_new_tokens=MAX_NEW_TOKENS
            )

            def on_retry(event: RetryEvent) -> None:
                errors[k][type(event.error).__name__] += 1

            async with gate:
                try:
                    return await policy.run(
                        lambda: collect(backends[k], request), on_retry=on_retry
                    )
                except BackendError as exc:
                    errors[k][type(exc).__name__] += 1
                    return exc

        outcomes = await asyncio.gather(*(one(k, i) for k in (0, 1) for i in range(per_double)))

    assert len(outcomes) == 2 * per_double
    ok = [o for o in outcomes if isinstance(o, Completion)]
    final_failures = len(outcomes) - len(ok)
    # Eight attempts at 30% faults: giving up is a ~1e-4 event per stream.
    assert final_failures <= 1
    for o in ok:
        assert o.text and o.finish_reason in ("stop", "length")
    for k, (plan, got) in enumerate(zip(plans, [tgi.stats.requests, oa.requests], strict=True)):
        successes = sum(isinstance(o, Completion) for o in outcomes[k * per_double :][:per_double])
        assert got == successes + plan.injected
        assert sum(errors[k].values()) == plan.injected
        assert plan.by_kind["truncate"] > 0 and plan.by_kind["stream_error"] > 0
        # An error event inside a 200 stream is a server error; a 503 an overload.
        assert errors[k]["OverloadedError"] == plan.by_kind["503"]
    # TGI: a stream with an event that is not JSON is a malformed response; an error
    # event (a cut-short generation ends with TGI's incomplete_generation_stream one) is
    # a server error.
    assert errors[0]["MalformedResponseError"] == plans[0].by_kind["malformed"]
    assert (
        errors[0]["ServerError"] == plans[0].by_kind["stream_error"] + plans[0].by_kind["truncate"]
    )
    injected = plans[0].by_kind + plans[1].by_kind
    print(
        f"\nstreams={len(outcomes)} ok={len(ok)} faults={sum(injected.values())} "
        f"[{' '.join(f'{k}={v}' for k, v in sorted(injected.items()))}] "
        f"errors={dict(errors[0] + errors[1])}"
    )


async def test_dead_member_trips_its_breaker() -> None:
    items = 120
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.001, max_backoff_s=0.01)
    dead_plan = FaultPlan(1.0, [Fault.status(503)], seed=0)
    async with AsyncExitStack() as stack:
        t1 = await stack.enter_async_context(TGIDouble())
        t2 = await stack.enter_async_context(TGIDouble())
        dead = await stack.enter_async_context(OpenAIDouble(faults=dead_plan))
        breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=3600.0)
        members = [
            Member(TGIBackend(t1.url, name="tgi-1"), retry=policy),
            Member(TGIBackend(t2.url, name="tgi-2"), retry=policy),
            Member(
                OpenAIBackend(dead.url, name="dead", model="double-model"),
                retry=policy,
                breaker=breaker,
            ),
        ]
        # Every candidate is awaited (no straggler cancelled), so each item asks "dead".
        ensemble = await stack.enter_async_context(
            Ensemble(
                members,
                policy="deadline",
                deadline_s=600.0,
                max_items_in_flight=4,
                min_candidates=2,  # decide on the healthy two while "dead" is down
            )
        )
        results = [
            r async for r in ensemble.map((f"question {i}" for i in range(items)), ordered=True)
        ]
        dead_snap = members[2].snapshot()

    assert [r.index for r in results] == list(range(items))
    assert breaker.state is BreakerState.OPEN
    assert dead_snap["breaker"] == "open"
    statuses = [r.candidates[2].status for r in results]
    assert all(s in ("unavailable", "circuit_open") for s in statuses)
    tripped = statuses.index("circuit_open")
    # Once open it stays open (the reset timeout is far away): every later item skips it.
    assert all(s == "circuit_open" for s in statuses[tripped + 4 :])
    assert statuses.count("circuit_open") == breaker.rejected > items // 2
    assert dead_snap["errors"]["CircuitOpenError"] == breaker.rejected
    # Only calls admitted before the breaker opened reached the dead server, each with
    # every attempt the policy allows.
    reached = dead_snap["failed"] - breaker.rejected
    assert reached >= breaker.failure_threshold
    assert dead.requests == reached * policy.max_attempts
    # The run finished with the healthy members: every item decided from their answers.
    for r in results:
        assert [c.status for c in r.candidates[:2]] == ["ok", "ok"]
        assert r.kept and r.winner is not None and r.winner.source in ("tgi-1", "tgi-2")
