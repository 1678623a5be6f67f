"""The Ensemble layer: fan-out, incremental decisions, straggler cancellation,
failures and breakers, and bounded, streaming ``map``."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from ensemble_async import errors
from ensemble_async.backend import BaseBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.breaker import CircuitBreaker
from ensemble_async.consensus import select
from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import (
    BackendInfo,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
)


class Fake(BaseBackend):
    """A backend whose answer is ``answer(prompt)``; it waits for ``gate`` when given."""

    kind = "fake"

    def __init__(
        self,
        name: str,
        answer: Callable[[str], str],
        *,
        gate: asyncio.Event | None = None,
        fail: BaseException | None = None,
    ) -> None:
        super().__init__(name=name)
        self.answer = answer
        self.gate = gate
        self.fail = fail
        self.calls = 0
        self.cancelled = 0
        self.started = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        self.calls += 1
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        text = self.answer(request.prompt or "")
        return [Completion(text=text, finish_reason="stop", backend=self.name, latency_s=0.0)]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        for c in await self.generate(request):
            yield c

    async def health(self) -> Health:
        return Health(ok=True, latency_s=0.0)

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, kind=self.kind)


def const(text: str) -> Callable[[str], str]:
    return lambda _prompt: text


def no_retry(backend: Fake, **kw: object) -> Member:
    return Member(backend, retry=RetryPolicy.never(), **kw)  # type: ignore[arg-type]


async def test_run_keeps_what_members_agree_on() -> None:
    members = [Fake("a", const("Paris.")), Fake("b", const("paris")), Fake("c", const("Lyon"))]
    async with Ensemble(members) as ens:
        result = await ens.run("Capital of France?")
    assert result.kept and result.text == "Paris."
    assert result.decision.selection.rule == "shortcut-first"
    assert [c.status for c in result.candidates] == ["ok", "ok", "ok"]
    assert result.winner is not None and result.winner.source == "a"
    record = result.to_dict()
    assert record["winner"] == "a" and len(record["candidates"]) == 3


async def test_exact_decides_early_and_cancels_the_straggler() -> None:
    never = asyncio.Event()
    slow = Fake("slow", const("something else"), gate=never)
    members = [Fake("a", const("yes")), Fake("b", const("Yes!")), slow]
    # Two agreeing candidates are enough here, so the straggler is not needed.
    async with Ensemble(members, policy="exact", min_candidates=2) as ens:
        result = await asyncio.wait_for(ens.run("q"), 10)
    assert result.text == "yes"
    assert result.decision.early
    assert result.candidates[2].status == "cancelled"
    assert slow.cancelled == 1
    assert ens.stats()["slow"]["in_flight"] == 0


async def test_exact_waits_when_a_straggler_could_change_the_outcome() -> None:
    gate = asyncio.Event()
    slow = Fake("slow", const("alpha beta"), gate=gate)
    members = [Fake("a", const("alpha beta gamma")), Fake("b", const("delta")), slow]
    async with Ensemble(members, policy="exact") as ens:
        task = asyncio.create_task(ens.run("q"))
        await slow.started.wait()
        await asyncio.sleep(0)  # let the fast members finish
        assert not task.done()
        gate.set()
        result = await task
    assert not result.decision.early
    assert result.decision.index == select(["alpha beta gamma", "delta", "alpha beta"]).index


@pytest.mark.parametrize("seed", range(25))
async def test_exact_equals_wait_all_for_any_arrival_order(seed: int) -> None:
    rng = random.Random(seed)
    vocab = ["red", "green", "blue", "Red.", "red green", "blue green red", ""]
    texts = [rng.choice(vocab) for _ in range(rng.randint(2, 5))]
    gates = [asyncio.Event() for _ in texts]
    members = [
        Fake(f"m{i}", const(t), gate=g) for i, (t, g) in enumerate(zip(texts, gates, strict=True))
    ]
    async with Ensemble(members, policy="exact") as ens:
        task = asyncio.create_task(ens.run("q"))
        for i in rng.sample(range(len(texts)), len(texts)):
            await members[i].started.wait()
            gates[i].set()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        result = await task
    assert result.decision.index == select(texts).index


async def test_quorum_decides_once_enough_agree() -> None:
    never = asyncio.Event()
    members = [
        Fake("a", const("the answer is 42")),
        Fake("b", const("The answer is 42.")),
        Fake("c", const("no idea"), gate=never),
        Fake("d", const("no idea"), gate=never),
    ]
    async with Ensemble(members, policy="quorum", quorum=2, min_candidates=2) as ens:
        result = await asyncio.wait_for(ens.run("q"), 10)
    assert result.decision.policy == "quorum"
    assert result.decision.index in (0, 1)
    assert {c.status for c in result.candidates[2:]} == {"cancelled"}


async def test_deadline_decides_with_what_arrived() -> None:
    never = asyncio.Event()
    members = [
        Fake("a", const("x y z")),
        Fake("b", const("x y")),
        Fake("c", const("q"), gate=never),
    ]
    async with Ensemble(members, policy="deadline", deadline_s=0.2, min_candidates=2) as ens:
        result = await asyncio.wait_for(ens.run("q"), 10)
    assert result.candidates[2].status == "cancelled"
    assert result.decision.arrived == (0, 1)
    assert result.kept


async def test_failed_and_broken_members_are_recorded_and_the_run_goes_on() -> None:
    bad = Fake("bad", const(""), fail=errors.ServerError("down"))
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=3600)
    members = [
        no_retry(Fake("a", const("blue"))),
        no_retry(Fake("b", const("Blue"))),
        no_retry(bad, breaker=breaker),
    ]
    async with Ensemble(members, min_candidates=2) as ens:
        statuses = [(await ens.run(f"q{i}")).candidates[2].status for i in range(4)]
        last = await ens.run("q-last")
    assert statuses == ["unavailable", "unavailable", "circuit_open", "circuit_open"]
    assert bad.calls == 2  # the open breaker sends nothing
    assert last.text == "blue"
    assert "CircuitOpenError" in (last.candidates[2].error or "")


async def test_every_member_failing_discards_the_item() -> None:
    members = [
        no_retry(Fake("a", const(""), fail=errors.BadRequestError("no"))),
        no_retry(Fake("b", const(""), fail=errors.ServerError("no"))),
    ]
    async with Ensemble(members) as ens:
        result = await ens.run("q")
    assert not result.kept
    assert result.rule == "too-few-candidates" and result.deferred  # "b" may come back
    assert [c.status for c in result.candidates] == ["failed", "unavailable"]


async def test_given_candidates_come_first() -> None:
    members = [Fake("a", const("Four")), Fake("b", const("five"))]
    async with Ensemble(members) as ens:
        result = await ens.run("2+2?", given=[("writer", "four")])
    assert result.candidates[0].status == "given"
    assert result.decision.index == 0 and result.text == "four"


async def test_per_member_requests_must_match_member_count() -> None:
    async with Ensemble([Fake("a", const("x")), Fake("b", const("x"))]) as ens:
        with pytest.raises(ValueError, match="one per member"):
            await ens.run([GenerationRequest(prompt="p")])


async def test_map_reads_input_lazily_and_streams_results() -> None:
    pulled = 0

    def endless() -> Iterator[str]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield f"p{i}"

    members = [Fake("a", lambda p: p), Fake("b", lambda p: p)]
    async with Ensemble(members, max_items_in_flight=4) as ens:
        got = []
        stream = ens.map(endless())
        async for result in stream:
            got.append(result)
            assert pulled <= len(got) + 4  # never more than the window ahead
            if len(got) == 50:
                break
        await stream.aclose()  # type: ignore[attr-defined]
    assert len({r.index for r in got}) == 50
    assert all(r.kept and r.text == r.key == f"p{r.index}" for r in got)


async def test_map_ordered_yields_in_input_order() -> None:
    gates = {i: asyncio.Event() for i in range(6)}

    class Slow(Fake):
        async def generate(self, request: GenerationRequest) -> list[Completion]:
            i = int((request.prompt or "p0")[1:])
            if i == 0:  # item 0 finishes last
                await asyncio.gather(*(gates[j].wait() for j in range(1, 6)))
            out = await super().generate(request)
            gates[i].set()
            return out

    async with Ensemble([Slow("a", lambda p: p)]) as ens:
        results = [r async for r in ens.map([f"p{i}" for i in range(6)], ordered=True)]
    assert [r.index for r in results] == list(range(6))
    assert [r.key for r in results] == [f"p{i}" for i in range(6)]


async def test_map_surfaces_an_input_error() -> None:
    def broken() -> Iterator[str]:
        yield "ok"
        raise RuntimeError("bad input line 2")

    async with Ensemble([Fake("a", const("x"))]) as ens:
        with pytest.raises(RuntimeError, match="bad input line 2"):
            async for _ in ens.map(broken()):
                pass


async def test_ensemble_over_real_tgi_doubles() -> None:
    async with TGIDouble() as d1, TGIDouble() as d2:
        backends = [TGIBackend(d1.url, name="t1"), TGIBackend(d2.url, name="t2")]
        async with Ensemble(backends, global_concurrency=8) as ens:
            results = [r async for r in ens.map([f"Say {i}" for i in range(40)])]
        stats = ens.stats()
    assert len(results) == 40
    # Both doubles answer the same prompt the same way, so every item is kept by rule 1.
    assert all(r.kept and r.decision.selection.rule == "shortcut-first" for r in results)
    assert stats["t1"]["done"] == 40 and stats["t2"]["done"] == 40


# ------------------------------------------------------------------- min_candidates


def refusing(name: str) -> Member:
    """A member whose server refuses every connection (retries spent at once)."""
    return no_retry(Fake(name, const(""), fail=errors.ConnectError("connection refused")))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("policy", ["exact", "quorum", "deadline"])
async def test_an_unavailable_member_defers_items_instead_of_a_single_voice(policy: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}"  # refuses every connection
    down = TGIBackend(url, name="down")
    members = [
        no_retry(Fake("a", lambda p: f"answer {p}")),
        Member(down, retry=RetryPolicy.never()),
    ]
    async with Ensemble(members, policy=policy, deadline_s=5.0) as ens:  # type: ignore[arg-type]
        results = [r async for r in ens.map([f"q{i}" for i in range(10)])]
    assert len(results) == 10
    assert not any(r.kept for r in results)
    assert all(r.rule == "too-few-candidates" for r in results)
    assert all(r.deferred for r in results)
    statuses = [r.candidates[1].status for r in results]
    assert set(statuses) <= {"unavailable", "circuit_open"} and "unavailable" in statuses
    assert all(r.to_dict()["deferred"] for r in results)

    # Without a minimum the same run keeps every item on one voice: what the default stops.
    members[1] = Member(TGIBackend(url, name="down"), retry=RetryPolicy.never())
    async with Ensemble(members, policy=policy, deadline_s=5.0, min_candidates=1) as ens:  # type: ignore[arg-type]
        results = [r async for r in ens.map([f"q{i}" for i in range(10)])]
    assert all(r.kept and r.rule == "single" for r in results)


async def test_a_request_failing_for_its_own_reason_is_no_unavailability() -> None:
    members = [
        no_retry(Fake("a", const("yes"))),
        no_retry(Fake("long", const(""), fail=errors.ContextLengthError("too long"))),
    ]
    async with Ensemble(members) as ens:
        result = await ens.run("q")
    # The failure is the request's own answer (it would fail the same way later): it is
    # recorded, and the item is decided, not deferred.
    assert result.candidates[1].status == "failed"
    assert "ContextLengthError" in (result.candidates[1].error or "")
    assert result.rule == "single" and result.kept and not result.deferred


async def test_too_few_is_decided_as_soon_as_the_minimum_is_out_of_reach() -> None:
    never = asyncio.Event()
    slow = Fake("slow", const("x"), gate=never)
    members = [no_retry(Fake("a", const("x"))), refusing("down"), no_retry(slow)]
    async with Ensemble(members, policy="exact", min_candidates=3) as ens:
        result = await asyncio.wait_for(ens.run("q"), 10)
    assert result.rule == "too-few-candidates" and result.deferred
    assert result.candidates[2].status == "cancelled"
    assert slow.cancelled == 1


async def test_exact_does_not_decide_early_below_the_minimum() -> None:
    gate = asyncio.Event()
    slow = Fake("slow", const("whatever"), gate=gate)
    members = [Fake("a", const("yes")), Fake("b", const("Yes!")), slow]
    async with Ensemble(members, policy="exact") as ens:  # default: every candidate
        task = asyncio.create_task(ens.run("q"))
        await slow.started.wait()
        await asyncio.sleep(0)  # let the fast members finish
        assert not task.done()  # two agree, but the default asks for all three
        gate.set()
        result = await task
    assert result.text == "yes" and not result.decision.early


async def test_given_candidates_count_towards_the_minimum() -> None:
    members = [no_retry(Fake("a", const("four"))), refusing("down")]
    async with Ensemble(members, min_candidates=2) as ens:
        result = await ens.run("2+2?", given=[("writer", "Four.")])
        assert result.kept and result.rule == "shortcut-first"
        with pytest.raises(ValueError, match="min_candidates=4"):
            await Ensemble(members, min_candidates=4).run("q", given=[("w", "x")])


async def test_map_results_carry_the_item_or_a_key() -> None:
    requests = [GenerationRequest(prompt=f"p{i}", seed=i) for i in range(5)]
    async with Ensemble([Fake("a", lambda p: p)]) as ens:
        by_item = [r async for r in ens.map(requests, ordered=True)]
        by_key = [r async for r in ens.map(requests, key=lambda r: r.seed)]  # type: ignore[union-attr]
    assert [r.key for r in by_item] == requests
    assert sorted(r.key for r in by_key) == [0, 1, 2, 3, 4]
    assert all(r.text == f"p{r.key}" for r in by_key)
    assert by_key[0].to_dict()["key"] == by_key[0].key


def test_wrapping_options_for_ready_members_are_an_error() -> None:
    ready = no_retry(Fake("ready", const("x")))
    with pytest.raises(ValueError, match=r"global_concurrency.*'ready'"):
        Ensemble([Fake("bare", const("x")), ready], global_concurrency=4)
    with pytest.raises(ValueError, match=r"retry.*'ready'"):
        Ensemble([ready], retry=RetryPolicy.never())
    ens = Ensemble([Fake("bare", const("x"))], global_concurrency=4, retry=RetryPolicy.never())
    assert ens.members[0].global_limit is ens.global_limit


async def test_a_decide_hook_makes_the_complete_decision_and_early_ones_stay_here() -> None:
    import pickle

    from ensemble_async.consensus import Decision, IncrementalSelector

    shipped: list[IncrementalSelector] = []

    async def elsewhere(selector: IncrementalSelector) -> Decision:
        shipped.append(selector)
        copy: IncrementalSelector = pickle.loads(pickle.dumps(selector))  # as elsewhere
        return copy.finalize()

    def members() -> list[Fake]:
        return [Fake("a", lambda p: p + " one"), Fake("b", lambda p: p), Fake("c", const("z"))]

    prompts = ["alpha beta", "gamma", "delta delta"]
    async with Ensemble(members()) as plain:
        expected = [(await plain.run(p)).decision for p in prompts]
    async with Ensemble(members(), decide=elsewhere) as hooked:
        got = [(await hooked.run(p)).decision for p in prompts]
        assert got == expected and len(shipped) == len(prompts)
        assert not any(s.done for s in shipped)  # nothing was decided here
        # An early exact decision (a shortcut) is still made here, as answers arrive.
        gate = asyncio.Event()
        early = [
            Fake("a", const("Yes")),
            Fake("b", const("yes!")),
            Fake("c", const("x"), gate=gate),
        ]
    async with Ensemble(early, decide=elsewhere, min_candidates=2) as hooked:
        result = await hooked.run("q")
    assert result.rule == "shortcut-first" and len(shipped) == len(prompts)
