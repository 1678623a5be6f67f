"""ensemble_async.replicas: one model on several servers as one Backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from ensemble_async.admission import AdaptiveLimiter
from ensemble_async.backend import BaseBackend
from ensemble_async.errors import BackendError, ConnectError, RequestTimeoutError, ServerError
from ensemble_async.member import Member
from ensemble_async.registry import create_backend
from ensemble_async.replicas import ReplicaSet, replica_label
from ensemble_async.retry import RetryPolicy
from ensemble_async.testing.faults import Fault
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import BackendInfo, Completion, GenerationRequest, TextDelta

REQUEST = GenerationRequest(prompt="hello", max_new_tokens=4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def doubles(*latencies: float, limit: int = 128) -> AsyncIterator[list[TGIDouble]]:
    async with contextlib.AsyncExitStack() as stack:
        found = []
        for latency in latencies:
            double = TGIDouble(latency=latency, max_concurrent_requests=limit)
            found.append(await stack.enter_async_context(double))
        yield found


def replica_set(ds: list[TGIDouble], **options: object) -> ReplicaSet:
    backend = create_backend("tgi", urls=[d.url for d in ds], name="m", **options)
    assert isinstance(backend, ReplicaSet)
    backend._rng = random.Random(7)
    return backend


def fast_retries() -> RetryPolicy:
    async def no_sleep(_: float) -> None:
        return None

    return RetryPolicy(max_attempts=4, initial_backoff_s=0.0, jitter=0.0, sleep=no_sleep)


async def test_create_backend_with_urls_is_one_backend_naming_its_replicas() -> None:
    async with doubles(0.0, 0.0) as ds:
        async with replica_set(ds) as backend:
            assert backend.name == "m"
            assert [r.label for r in backend.replicas] == [replica_label(d.url) for d in ds]
            info = await backend.info()
            assert info.name == "m" and info.max_concurrency == 256
            [c] = await backend.generate(REQUEST)
            assert c.backend == "m"
            assert c.replica in {replica_label(d.url) for d in ds}
            events = [e async for e in backend.stream(REQUEST)]
            assert all(isinstance(e, TextDelta) for e in events[:-1])
            last = events[-1]
            assert isinstance(last, Completion) and last.backend == "m" and last.replica
            health = await backend.health()
            assert health.ok and health.detail == "2/2 replicas healthy"
            # One pooled session for all replicas, owned and closed by the set.
            sessions = {r.backend._http.session for r in backend.replicas}  # type: ignore[attr-defined]
            assert len(sessions) == 1
        assert all(s.closed for s in sessions)


def test_bad_replica_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        create_backend("tgi", urls=[])
    with pytest.raises(ValueError, match="not both"):
        create_backend("tgi", urls=["http://127.0.0.1:1"], url="http://127.0.0.1:2")
    with pytest.raises(ValueError, match="repeat"):
        create_backend("tgi", urls=["http://127.0.0.1:1", "http://127.0.0.1:1"])


async def test_load_is_even_across_equal_replicas() -> None:
    # 20 ms service time: the latency samples that weight the choice must not be
    # dominated by the scheduling noise of a busy machine (at 2 ms, a loaded CI run once
    # skewed the split to 64..118)
    async with doubles(0.02, 0.02, 0.02, 0.02) as ds, replica_set(ds) as backend:
        sem = asyncio.Semaphore(16)

        async def one() -> str | None:
            async with sem:
                [c] = await backend.generate(REQUEST)
                return c.replica

        replicas = await asyncio.gather(*(one() for _ in range(400)))
    counts = [d.stats.requests for d in ds]
    assert sum(counts) == 400
    assert sorted({r for r in replicas if r}) == sorted(replica_label(d.url) for d in ds)
    assert max(counts) <= 1.5 * min(counts), counts


async def test_a_slow_replica_gets_fewer_requests() -> None:
    async with doubles(0.005, 0.005, 0.05) as ds, replica_set(ds) as backend:
        sem = asyncio.Semaphore(12)

        async def one() -> None:
            async with sem:
                await backend.generate(REQUEST)

        await asyncio.gather(*(one() for _ in range(300)))
    fast = (ds[0].stats.requests + ds[1].stats.requests) / 2
    slow = ds[2].stats.requests
    assert slow < 0.5 * fast, [d.stats.requests for d in ds]


async def test_each_replica_is_bounded_by_its_own_limit() -> None:
    async with doubles(0.02, 0.02, limit=2) as ds, replica_set(ds) as backend:
        info = await backend.info()
        assert [r.limit for r in backend.replicas] == [2, 2] and info.max_concurrency == 4
        results = await asyncio.gather(*(backend.generate(REQUEST) for _ in range(12)))
    assert len(results) == 12
    assert [d.stats.max_active for d in ds] == [2, 2]
    assert all(r.outstanding == 0 for r in backend.replicas)


async def test_a_failed_replica_is_ejected_and_the_retry_lands_on_another() -> None:
    clock = FakeClock()
    async with doubles(0.0, 0.0, 0.0) as ds:
        backend = replica_set(ds)
        backend._clock = clock
        dead = ds[1]
        await dead.stop()  # connections refused from now on
        member = Member(backend, retry=fast_retries(), concurrency=4)
        async with member:
            results = await asyncio.gather(*(member.generate(REQUEST) for _ in range(40)))
            snap = {s["replica"]: s for s in backend.snapshot()}
    assert len(results) == 40
    assert {c.replica for [c] in results} <= {replica_label(ds[0].url), replica_label(ds[2].url)}
    gone = snap[replica_label(dead.url)]
    assert not gone["in_service"]
    # The clock did not move: no probe, so the dead one failed as few times as the
    # requests that were already on their way to it when it first failed.
    assert 1 <= gone["failures"] <= 4
    assert member.stats.snapshot()["failed"] == 0


async def test_an_ejected_replica_is_probed_back_in_after_its_backoff() -> None:
    clock = FakeClock()
    async with doubles(0.0, 0.0) as ds, replica_set(ds, eject_s=2.0) as backend:
        backend._clock = clock
        sick, well = ds
        sick.faults.push(Fault.status(500), Fault.status(500))
        # The first request goes to the sick one (it looks far faster).
        backend.replicas[0].latency_s, backend.replicas[1].latency_s = 1e-9, 1.0
        with pytest.raises(ServerError):
            await backend.generate(REQUEST)
        assert not backend.replicas[0].in_service
        for _ in range(5):  # within the backoff: all to the well one
            [c] = await backend.generate(REQUEST)
            assert c.replica == replica_label(well.url)
        assert sick.stats.requests == 1
        clock.now += 2.0
        # The backoff is over: one request probes the sick replica; it fails again,
        # so it is out for twice as long.
        with pytest.raises(ServerError):
            await backend.generate(REQUEST)
        assert sick.stats.requests == 2
        assert backend.replicas[0].backoff_s == 4.0
        clock.now += 3.0
        await backend.generate(REQUEST)
        assert sick.stats.requests == 2  # still out
        clock.now += 1.0
        [c] = await backend.generate(REQUEST)  # the probe succeeds
        assert c.replica == replica_label(sick.url)
        assert backend.replicas[0].in_service and backend.replicas[0].backoff_s == 0.0


async def test_health_brings_a_healthy_ejected_replica_back() -> None:
    async with doubles(0.0, 0.0) as ds, replica_set(ds) as backend:
        ds[0].faults.push(Fault.status(500))
        backend.replicas[0].latency_s, backend.replicas[1].latency_s = 1e-9, 1.0
        with pytest.raises(ServerError):
            await backend.generate(REQUEST)
        assert not backend.replicas[0].in_service
        health = await backend.health()
        assert health.ok and backend.replicas[0].in_service


async def test_all_replicas_down_raise_the_usual_error() -> None:
    clock = FakeClock()
    async with doubles(0.0, 0.0) as ds:
        urls = [d.url for d in ds]
        for d in ds:
            await d.stop()
    backend = create_backend("tgi", urls=urls, name="m")
    assert isinstance(backend, ReplicaSet)
    backend._clock = clock
    async with backend:
        for _ in range(2):
            with pytest.raises(ConnectError):
                await backend.generate(REQUEST)
        assert not any(r.in_service for r in backend.replicas)
        sent = sum(r.requests for r in backend.replicas)
        with pytest.raises(ConnectError, match="all 2 replicas are out of service"):
            await backend.generate(REQUEST)
        assert sum(r.requests for r in backend.replicas) == sent  # failed without sending
        health = await backend.health()
        assert not health.ok
        member = Member(backend, retry=fast_retries())
        with pytest.raises(ConnectError):
            await member.generate(REQUEST)


async def test_prefix_affinity_keeps_shared_prompts_on_one_replica() -> None:
    demos = "Example 1: ...\n" * 20
    async with doubles(0.0, 0.0, 0.0, 0.0) as ds, replica_set(ds, affinity_chars=200) as b:
        for i in range(30):
            await b.generate(GenerationRequest(prompt=demos + f"task {i}", max_new_tokens=4))
        counts = sorted(d.stats.requests for d in ds)
        assert counts == [0, 0, 0, 30]
        # Loaded beyond the slack, the home replica gives way to the others.
        many = [GenerationRequest(prompt=demos + f"job {i}", max_new_tokens=4) for i in range(40)]
        await asyncio.gather(*(b.generate(r) for r in many))
        assert sum(d.stats.requests > 0 for d in ds) > 1


async def test_without_affinity_shared_prompts_spread() -> None:
    demos = "Example 1: ...\n" * 20
    async with doubles(0.0, 0.0, 0.0, 0.0) as ds, replica_set(ds) as b:
        for i in range(40):
            await b.generate(GenerationRequest(prompt=demos + f"task {i}", max_new_tokens=4))
        assert all(d.stats.requests > 0 for d in ds)


async def test_streams_eject_a_dead_replica_and_release_slots_when_closed_early() -> None:
    clock = FakeClock()
    async with doubles(0.0, 0.0) as ds:
        backend = replica_set(ds)
        backend._clock = clock
        await ds[0].stop()
        backend.replicas[0].latency_s, backend.replicas[1].latency_s = 1e-9, 1.0
        async with backend:
            with pytest.raises(ConnectError):
                async for _ in backend.stream(REQUEST):
                    pass
            assert not backend.replicas[0].in_service
            stream = backend.stream(REQUEST)
            assert isinstance(stream, AsyncGenerator)
            first = await anext(stream)
            assert isinstance(first, TextDelta)
            assert backend.replicas[1].outstanding == 1
            await stream.aclose()  # the consumer stops early
            assert [r.outstanding for r in backend.replicas] == [0, 0]
            assert backend.replicas[1].in_service


async def test_requests_waiting_for_a_slot_all_fail_when_every_replica_is_ejected() -> None:
    async with doubles(0.0, 0.0) as ds:
        urls = [d.url for d in ds]
        for d in ds:
            await d.stop()
    async with create_backend("tgi", urls=urls, name="m") as backend:
        assert isinstance(backend, ReplicaSet)
        for r in backend.replicas:
            r.limit = 1  # two requests in flight, the other six wait for a slot
        async with asyncio.timeout(30):  # a lost wake-up would hang here
            results = await asyncio.gather(
                *(backend.generate(REQUEST) for _ in range(8)), return_exceptions=True
            )
    assert all(isinstance(r, ConnectError) for r in results)
    assert sum(r.requests for r in backend.replicas) == 2  # the others never sent


async def test_a_cancelled_slow_call_raises_the_replicas_latency_estimate() -> None:
    clock = FakeClock()
    async with doubles(30.0, 0.0) as ds, replica_set(ds) as backend:
        backend._clock = clock
        hung = backend.replicas[0]
        hung.latency_s, backend.replicas[1].latency_s = 0.01, 1.0
        task = asyncio.create_task(backend.generate(REQUEST))
        await ds[0].wait_active()
        clock.now += 5.0  # the member's attempt timeout would fire about now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hung.in_service and hung.outstanding == 0
        assert hung.latency_s > 0.9  # 0.01 + 0.2 * (5 - 0.01)


async def test_openai_compatible_replicas_work_the_same_way() -> None:
    async with contextlib.AsyncExitStack() as stack:
        ds = [await stack.enter_async_context(OpenAIDouble()) for _ in range(3)]
        backend = create_backend("openai", urls=[d.url for d in ds], name="v")
        async with backend:
            assert isinstance(backend, ReplicaSet)
            got = await asyncio.gather(*(backend.generate(REQUEST) for _ in range(30)))
        assert {c.backend for [c] in got} == {"v"}
        assert {c.replica for [c] in got} == {replica_label(d.url) for d in ds}


def test_records_name_the_replica_that_answered(tmp_path: Path) -> None:
    """A member spread over replicas is one voice; each candidate's host is the replica."""
    from served import Server

    from ensemble_async import cli

    tgi = Server("tgi", "--ei", "writer-lm")
    replicas = [Server("openai", "--ei", "answer-lm") for _ in range(2)]
    try:
        out = tmp_path / "records.jsonl"
        urls = ", ".join(f'"{r.url}"' for r in replicas)
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(
            f"""
[run]
seed = 3
output = "{out}"
targets = {{ input_output = 6, output = 3 }}

[backends.writer]
kind = "tgi"
url = "{tgi.url}"

[backends.answerer]
kind = "openai"
urls = [{urls}]

[roles]
writer = "writer"
answerers = ["answerer"]
"""
        )
        assert cli.main(["generate", "--config", str(cfg), "--quiet"]) == cli.EXIT_OK
    finally:
        for server in (tgi, *replicas):
            server.stop()
    hosts = set()
    for line in out.read_text().splitlines():
        record = json.loads(line)
        candidates = record["provenance"]["candidates"]
        assert [c["source"] for c in candidates] == ["writer", "answerer"]  # one voice
        hosts.add(candidates[1]["host"])
    expected = {r.url.removeprefix("http://") for r in replicas}
    assert hosts <= expected and len(hosts) == 2  # both replicas answered, each named


def test_marking_a_completion_keeps_every_field_but_backend_and_replica() -> None:
    """``ReplicaSet`` rebuilds completions field by field (for speed): a field added to
    ``Completion`` later must not be dropped there."""
    import dataclasses

    from ensemble_async.types import Completion

    values: dict[str, object] = {}
    for f in dataclasses.fields(Completion):
        values[f.name] = {
            "text": "t",
            "finish_reason": "length",
            "latency_s": 0.25,
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "index": 2,
        }.get(f.name, f"value-of-{f.name}")
    original = Completion(**values)  # type: ignore[arg-type]
    from ensemble_async.backends.tgi import TGIBackend

    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    rs = ReplicaSet.from_urls(TGIBackend, urls, name="set", session=object())
    replica = rs.replicas[1]
    marked = rs._mark(original, replica)
    assert marked == dataclasses.replace(original, backend="set", replica=replica.label)


async def test_an_untried_replica_is_tried_even_behind_a_fast_one() -> None:
    """Sequential requests: once one replica has answered quickly, the other (no latency
    sample yet) must still be tried, not left unpicked for good."""

    class Quick(BaseBackend):
        kind = "quick"

        async def generate(self, request: GenerationRequest) -> list[Completion]:
            return [Completion(text="ok", finish_reason="stop", backend=self.name, latency_s=0)]

    ticks = iter(range(10_000))
    rs = ReplicaSet([Quick(name="a"), Quick(name="b")], name="set", clock=lambda: next(ticks))
    # replica a has answered fast already; the set's average is much slower
    rs.replicas[0].latency_s = 0.001
    rs._set_latency = 5.0
    await rs.generate(GenerationRequest(prompt="x"))
    assert rs.replicas[1].requests == 1


async def test_a_waiter_cancelled_just_after_its_wake_up_passes_the_turn_on() -> None:
    """A request woken for a free slot but cancelled before it ran (the member's attempt
    timeout, a straggler no longer needed) must wake the next waiter, or that one waits
    for a release that never comes."""

    class Quick(BaseBackend):
        kind = "quick"

        async def generate(self, request: GenerationRequest) -> list[Completion]:
            return [Completion(text="ok", finish_reason="stop", backend=self.name, latency_s=0)]

    rs = ReplicaSet([Quick(name="a")], name="set")
    rs.replicas[0].limit = 1
    held = await rs._acquire(REQUEST)  # the one slot, taken
    first = asyncio.create_task(rs.generate(REQUEST))
    second = asyncio.create_task(rs.generate(REQUEST))
    await asyncio.sleep(0)  # one step each: both find the slot taken and queue
    assert len(rs._waiters) == 2
    rs._release(held, 0.0, None)  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(5):  # a lost wake-up would hang here
        [c] = await second
    assert c.text == "ok" and rs.replicas[0].outstanding == 0


class Held(BaseBackend):
    """Each call waits until the test answers it (``answer``); ``instant`` answers all."""

    kind = "held"

    def __init__(self, name: str, *, instant: bool = False, expect: int = 0) -> None:
        super().__init__(name=name)
        self.instant = instant
        self.pending: list[asyncio.Future[None]] = []
        self.expected = asyncio.Event()  # set once ``expect`` calls have arrived
        self._expect = expect

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        if not self.instant:
            future = asyncio.get_running_loop().create_future()
            self.pending.append(future)
            if len(self.pending) == self._expect:
                self.expected.set()
            await future
        return [Completion(text="ok", finish_reason="stop", backend=self.name, latency_s=0)]

    def answer(self, call: int) -> None:
        self.pending[call].set_result(None)


async def test_a_replica_back_in_service_takes_every_waiter_it_has_room_for() -> None:
    """A probe's success brings a whole replica's capacity back: every request waiting
    for a slot must look again, not one per later release (the others would sit there,
    their attempt timeout running, next to free slots)."""
    clock = FakeClock()
    busy, back = Held("busy"), Held("back", expect=3)
    rs = ReplicaSet([busy, back], name="set", clock=clock)
    rs.replicas[0].limit, rs.replicas[1].limit = 1, 3
    rs._take(rs.replicas[0])  # the busy replica's one slot, never released here
    rs._eject(rs.replicas[1], clock.now)
    clock.now += 5.0  # its backoff is over: the next request probes it
    probe = asyncio.create_task(rs.generate(REQUEST))
    await asyncio.sleep(0)
    assert rs.replicas[1].probing
    waiting = [asyncio.create_task(rs.generate(REQUEST)) for _ in range(2)]
    await asyncio.sleep(0)
    assert len(rs._waiters) == 2
    back.answer(0)  # the probe succeeds
    [c] = await probe
    assert c.replica == "back" and rs.replicas[1].in_service
    async with asyncio.timeout(5):  # a waiter left parked would hang here
        await back.expected.wait()  # both waiters now run on the returned replica
    back.answer(1)
    back.answer(2)
    results = await asyncio.gather(*waiting)
    assert [c.replica for [c] in results] == ["back", "back"]
    assert rs.replicas[1].outstanding == 0


async def test_health_bringing_a_replica_back_wakes_the_waiters() -> None:
    clock = FakeClock()
    busy, back = Held("busy"), Held("back", instant=True)
    rs = ReplicaSet([busy, back], name="set", clock=clock)
    rs.replicas[0].limit, rs.replicas[1].limit = 1, 2
    rs._take(rs.replicas[0])
    rs._eject(rs.replicas[1], clock.now)
    waiting = [asyncio.create_task(rs.generate(REQUEST)) for _ in range(2)]
    await asyncio.sleep(0)
    assert len(rs._waiters) == 2
    health = await rs.health()
    assert health.ok and rs.replicas[1].in_service
    async with asyncio.timeout(5):  # the waiters would wait for a release that never comes
        results = await asyncio.gather(*waiting)
    assert [c.replica for [c] in results] == ["back", "back"]


async def test_failing_at_once_while_all_are_out_is_no_overload_signal() -> None:
    """While every replica is out, calls fail without sending anything; even when the
    replicas were ejected for timeouts, that must not keep halving the member's
    adaptive limit (it would sit at its minimum when the servers come back)."""

    class Hung(BaseBackend):
        kind = "hung"

        async def generate(self, request: GenerationRequest) -> list[Completion]:
            raise RequestTimeoutError("no answer", backend=self.name)

    rs = ReplicaSet([Hung(name="a"), Hung(name="b")], name="set", clock=FakeClock())
    member = Member(rs, concurrency=AdaptiveLimiter(8, maximum=8), retry=fast_retries())
    for _ in range(5):
        with pytest.raises(BackendError):
            await member.generate(REQUEST)
    assert not any(r.in_service for r in rs.replicas)
    assert sum(r.requests for r in rs.replicas) == 2  # one real timeout per replica
    assert member.limiter.decreases == 2 and member.limiter.limit == 2
    with pytest.raises(ConnectError, match=r"out of service; last: \[[ab]\] no answer"):
        await rs.generate(REQUEST)


async def test_a_replica_back_in_service_has_its_limit_read_again() -> None:
    """A replica that was down when the set read its facts, or that restarted with
    another limit, must not keep an unknown (unbounded) or stale limit once it is back."""

    class Restarting(BaseBackend):
        kind = "restarting"

        def __init__(self, name: str, limit: int) -> None:
            super().__init__(name=name)
            self.limit = limit
            self.down = False

        async def generate(self, request: GenerationRequest) -> list[Completion]:
            return [Completion(text="ok", finish_reason="stop", backend=self.name, latency_s=0)]

        async def info(self) -> BackendInfo:
            if self.down:
                raise ConnectError("refused", backend=self.name)
            return BackendInfo(name=self.name, kind=self.kind, max_concurrency=self.limit)

    clock = FakeClock()
    up, late = Restarting("up", 4), Restarting("late", 4)
    late.down = True
    rs = ReplicaSet([up, late], name="set", clock=clock)
    await rs.info()
    assert [r.limit for r in rs.replicas] == [4, None]  # down at start: unknown
    late.down = False
    rs._eject(rs.replicas[1], clock.now)  # (it failed its calls meanwhile)
    assert (await rs.health()).ok and rs.replicas[1].in_service
    await asyncio.gather(*rs._relearning)
    assert rs.replicas[1].limit == 4
    # It restarts with a smaller limit; the probe after its backoff brings it back.
    late.limit = 2
    rs._eject(rs.replicas[1], clock.now)
    clock.now += 5.0
    [c] = await rs.generate(REQUEST)
    assert c.replica == "late" and rs.replicas[1].in_service
    await asyncio.gather(*rs._relearning)
    assert rs.replicas[1].limit == 2
    await rs.aclose()
