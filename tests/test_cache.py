"""ResponseCache and the member's use of it: keys, hits and misses, secrets, concurrency,
SIGKILL, and the cache sitting above admission."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from ensemble_async.admission import AdaptiveLimiter, GlobalLimit, TokenBucket
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.breaker import CircuitBreaker
from ensemble_async.cache import CacheError, ResponseCache, cache_key
from ensemble_async.errors import ConnectError
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.scoring import CompletionScore
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.types import (
    BackendInfo,
    ChatMessage,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)

REQUEST = GenerationRequest(
    prompt="Write a haiku about rivers.",
    max_new_tokens=32,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    stop=("\n\n",),
    seed=11,
    n=2,
    extra={"repetition_penalty": 1.1, "a": [1, 2]},
)


class CountingBackend:
    """A deterministic fake backend that counts its calls."""

    kind = "fake"

    def __init__(self, name: str = "fake-1", model: str | None = "fake-model") -> None:
        self._name = name
        self.model = model
        self.calls = 0
        self.info_calls = 0
        self.info_error: Exception | None = None
        self.closed = False

    @property
    def name(self) -> str:
        return self._name

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        self.calls += 1
        text = f"{request.prompt or request.messages}|{request.seed}|call{self.calls}"
        return [
            Completion(
                text=f"{text}|{i}",
                finish_reason="stop",
                backend=self.name,
                latency_s=0.25,
                prompt_tokens=5,
                completion_tokens=3,
                model=self.model,
                index=i,
            )
            for i in range(request.n)
        ]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        yield TextDelta("x")
        yield (await self.generate(request))[0]

    async def health(self) -> Health:
        return Health(ok=True, latency_s=0.0, detail="fine")

    async def info(self) -> BackendInfo:
        self.info_calls += 1
        if self.info_error is not None:
            raise self.info_error
        return BackendInfo(name=self.name, kind=self.kind, model=self.model)

    async def aclose(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# ------------------------------------------------------------------------------ keys


def test_key_is_hex_sha256_and_stable_in_process() -> None:
    key = cache_key("tgi", "a", "m", REQUEST)
    assert len(key) == 64
    assert all(c in "0123456789abcdef" for c in key)
    same = GenerationRequest(**{f: getattr(REQUEST, f) for f in REQUEST.__dataclass_fields__})
    assert cache_key("tgi", "a", "m", same) == key


def test_key_is_stable_across_processes() -> None:
    here = cache_key("openai", "vllm-1", "llama", REQUEST)
    code = textwrap.dedent(
        """
        from ensemble_async.cache import cache_key
        from ensemble_async.types import GenerationRequest
        r = GenerationRequest(
            prompt="Write a haiku about rivers.", max_new_tokens=32, temperature=0.7,
            top_p=0.9, top_k=40, stop=("\\n\\n",), seed=11, n=2,
            extra={"a": [1, 2], "repetition_penalty": 1.1},
        )
        print(cache_key("openai", "vllm-1", "llama", r))
        """
    )
    keys = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        keys.add(out.stdout.strip())
    assert keys == {here}


def test_key_ignores_spelling_differences() -> None:
    a = GenerationRequest(prompt="p", temperature=0, top_p=1, extra={"x": 1, "y": 2})
    b = GenerationRequest(prompt="p", temperature=0.0, top_p=1.0, extra={"y": 2, "x": 1})
    assert cache_key("k", "n", None, a) == cache_key("k", "n", None, b)


def test_every_field_and_identity_part_changes_the_key() -> None:
    base = GenerationRequest(prompt="p")
    variants = [
        base,
        base.replace(prompt="q"),
        GenerationRequest(messages=(ChatMessage("user", "p"),)),
        GenerationRequest(messages=(ChatMessage("system", "p"),)),
        base.replace(max_new_tokens=255),
        base.replace(min_new_tokens=1),
        base.replace(temperature=0.5),
        base.replace(top_p=0.5),
        base.replace(top_k=5),
        base.replace(stop=("x",)),
        base.replace(stop=("x", "y")),
        base.replace(seed=0),
        base.replace(seed=1),
        base.replace(n=2),
        base.replace(extra={"logprobs": 1}),
        base.replace(extra={"logprobs": 2}),
    ]
    keys = [cache_key("tgi", "a", "m", r) for r in variants]
    keys += [
        cache_key("openai", "a", "m", base),
        cache_key("tgi", "b", "m", base),
        cache_key("tgi", "a", "m2", base),
        cache_key("tgi", "a", None, base),
    ]
    assert len(set(keys)) == len(keys)


def test_unserialisable_extra_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot be cached"):
        cache_key("k", "n", None, GenerationRequest(prompt="p", extra={"f": object()}))


# ---------------------------------------------------------------------------- cache


def cached(backend: CountingBackend, cache: ResponseCache, **kw: object) -> Member:
    """A member with a response cache and no retries."""
    return Member(backend, cache=cache, retry=RetryPolicy.never(), **kw)  # type: ignore[arg-type]


def hits_misses(member: Member) -> tuple[int, int]:
    return member.stats.cache_hits, member.stats.cache_misses


async def test_put_get_roundtrip_and_reopen(tmp_path: Path) -> None:
    backend = CountingBackend()
    completions = await backend.generate(REQUEST)
    path = tmp_path / "sub" / "cache.sqlite"
    async with ResponseCache(path) as cache:
        assert await cache.get("k1") is None
        await cache.put("k1", completions)
        assert await cache.get("k1") == completions
        # First answer wins: a second put under the same key keeps the first.
        await cache.put("k1", list(reversed(completions)))
        assert await cache.get("k1") == completions
        assert await cache.count() == 1
    again = await ResponseCache.open(path)
    try:
        assert await again.get("k1") == completions
    finally:
        await again.aclose()


async def test_scores_with_infinite_log_probabilities_are_stored_and_read_back(
    tmp_path: Path,
) -> None:
    """A server may give a token -Infinity (or NaN): the scores are stored as they are
    (storing them used to raise, and the run stopped at that item on every rerun)."""
    scores = [
        CompletionScore("a", (-0.5, -math.inf), ("x", "y"), backend="t", model="m"),
        CompletionScore("b", (math.nan,), None, backend="t"),
    ]
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        await cache.put_scores("s1", scores)
        got = await cache.get_scores("s1")
    assert got is not None
    assert got[0] == scores[0]
    assert got[1].text == "b" and math.isnan(got[1].token_logprobs[0])


async def test_opening_happens_off_the_loop_and_lazily(tmp_path: Path) -> None:
    path = tmp_path / "lazy" / "c.sqlite"
    cache = ResponseCache(path)  # touches no disk
    assert not path.parent.exists()
    try:
        assert await cache.get("k") is None  # the first statement opens the file
        assert path.exists()
    finally:
        await cache.aclose()


async def test_member_cache_hits_and_misses(tmp_path: Path) -> None:
    backend = CountingBackend()
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = cached(backend, cache)
        first = await member.generate(REQUEST)
        second = await member.generate(REQUEST)
        other = await member.generate(REQUEST.replace(seed=12))
        assert backend.calls == 2
        assert second == first
        assert other != first
        assert hits_misses(member) == (1, 2)
        snap = member.snapshot()
        assert (snap["cache_hits"], snap["cache_misses"]) == (1, 2)
        assert snap["done"] == 2  # requests: the hit is not one
        assert backend.info_calls == 1  # identity read once, lazily
        assert await member.cache_key_for(REQUEST) == cache_key(
            "fake", "fake-1", "fake-model", REQUEST
        )

    # A new process/run: a fresh backend object, same cache file -> no call at all.
    fresh = CountingBackend()
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        async with cached(fresh, cache) as m2:
            assert await m2.generate(REQUEST) == first
            assert fresh.calls == 0
            assert hits_misses(m2) == (1, 0)
        assert fresh.closed  # the member closes its backend ...
        assert await cache.count() == 2  # ... but not the cache, which is the caller's


async def test_a_member_without_cache_reports_no_cache_counts() -> None:
    assert "cache_hits" not in Member(CountingBackend()).snapshot()


async def test_model_is_part_of_the_identity(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        a = cached(CountingBackend(model="m-a"), cache)
        b_backend = CountingBackend(model="m-b")
        b = cached(b_backend, cache)
        await a.generate(REQUEST)
        await b.generate(REQUEST)
        assert b_backend.calls == 1
        assert hits_misses(b) == (0, 1)


async def test_identity_override_skips_info(tmp_path: Path) -> None:
    backend = CountingBackend()
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = cached(backend, cache, cache_identity="configured-model")
        await member.generate(REQUEST)
        assert backend.info_calls == 0
        assert await member.cache_key_for(REQUEST) == cache_key(
            "fake", "fake-1", "configured-model", REQUEST
        )


async def test_info_failure_propagates_and_is_retried(tmp_path: Path) -> None:
    backend = CountingBackend()
    backend.info_error = ConnectError("down", backend="fake-1")
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = cached(backend, cache)
        with pytest.raises(ConnectError):
            await member.generate(REQUEST)
        assert backend.calls == 0
        assert await cache.count() == 0
        backend.info_error = None
        await member.generate(REQUEST)
        assert backend.info_calls == 2
        assert hits_misses(member) == (0, 1)


async def test_start_reads_the_identity_once_for_the_cache(tmp_path: Path) -> None:
    backend = CountingBackend()
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = cached(backend, cache)
        await member.start()
        await member.generate(REQUEST)
        assert backend.info_calls == 1


async def test_streams_are_not_cached(tmp_path: Path) -> None:
    backend = CountingBackend()
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = cached(backend, cache)
        events = [e async for e in member.stream(GenerationRequest(prompt="s"))]
        assert isinstance(events[0], TextDelta)
        assert isinstance(events[-1], Completion)
        assert await cache.count() == 0


async def test_concurrent_gets_and_puts(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = cached(CountingBackend(), cache, concurrency=1000)
        requests = [GenerationRequest(prompt=f"p{i}", seed=i) for i in range(150)]
        first = await asyncio.gather(*(member.generate(r) for r in requests))
        # Mixed: every request again (hits) interleaved with 50 new ones (misses).
        more = [GenerationRequest(prompt=f"q{i}") for i in range(50)]
        second = await asyncio.gather(*(member.generate(r) for r in [*requests, *more]))
        assert second[:150] == first
        assert [c[0].text.split("|")[0] for c in second[150:]] == [f"q{i}" for i in range(50)]
        assert hits_misses(member) == (150, 200)
        assert await cache.count() == 200


async def test_hits_take_no_admission_and_are_not_requests(tmp_path: Path) -> None:
    """The cache sits above admission: a hit takes no slot, no rate token, no global
    slot, and is no breaker/AIMD success or latency sample."""
    backend = CountingBackend()
    now = [0.0]  # the buckets' clock never moves: no refill during the test

    async def no_sleep(_s: float) -> None:
        raise AssertionError("a cached request waited for a rate token")

    rpm = TokenBucket(60, burst=1, clock=lambda: now[0], sleep=no_sleep)
    tpm = TokenBucket(60_000, burst=1000, clock=lambda: now[0], sleep=no_sleep)
    limiter = AdaptiveLimiter(1, maximum=64)
    global_limit = GlobalLimit(1)
    breaker = CircuitBreaker(failure_threshold=1)
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        member = Member(
            backend,
            cache=cache,
            cache_identity="m",
            concurrency=limiter,
            rpm=rpm,
            tpm=tpm,
            global_limit=global_limit,
            breaker=breaker,
            retry=RetryPolicy.never(),
        )
        await member.generate(REQUEST)  # the one real request: takes the only rpm token
        rpm_left, tpm_left = rpm.available, tpm.available
        assert rpm_left < 1
        snap = member.snapshot()
        aimd = (limiter.limit, limiter.increases)
        # 30 identical requests at once, with one slot, one global slot, no rpm token
        results = await asyncio.gather(*(member.generate(REQUEST) for _ in range(30)))
        assert all(r == results[0] for r in results)
        assert backend.calls == 1
        assert (rpm.available, tpm.available) == (rpm_left, tpm_left)
        assert limiter.in_flight == 0
        assert (limiter.limit, limiter.increases) == aimd  # hits are no AIMD successes
        assert global_limit.in_flight == 0
        after = member.snapshot()
        assert hits_misses(member) == (30, 1)
        for counter in ("done", "failed", "completions", "prompt_tokens", "completion_tokens"):
            assert after[counter] == snap[counter], counter
        assert after["latency_s"]["samples"] == 1
        # Hits say nothing about health: a failure right after them still counts first.
        failing = Member(
            _Failing(), cache=cache, cache_identity="m", breaker=breaker, retry=RetryPolicy.never()
        )
        with pytest.raises(ConnectError):
            await failing.generate(REQUEST.replace(seed=99))
        assert str(breaker.state) == "open"


class _Failing(CountingBackend):
    async def generate(self, request: GenerationRequest) -> list[Completion]:
        raise ConnectError("refused", backend=self.name)


async def test_cancelled_put_still_completes(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        gate = threading.Event()
        blocker = cache._pool.submit(gate.wait)  # hold the worker thread
        completions = await CountingBackend().generate(REQUEST)
        task = asyncio.create_task(cache.put("k", completions))
        await asyncio.sleep(0)  # let the task queue its write
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        blocker.result()
        assert await cache.get("k") == completions


async def test_a_failed_store_fails_the_call(tmp_path: Path) -> None:
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        # Stand-in for a full disk: the connection refuses writes from now on.
        await cache._run(lambda: cache._connection().execute("PRAGMA query_only=ON"))
        backend = CountingBackend()
        with pytest.raises(CacheError, match=r"c\.sqlite"):
            await cached(backend, cache).generate(REQUEST)
        assert backend.calls == 1
        assert await cache.count() == 0


async def test_closed_cache_refuses_work(tmp_path: Path) -> None:
    cache = await ResponseCache.open(tmp_path / "c.sqlite")
    await cache.aclose()
    await cache.aclose()  # idempotent
    with pytest.raises(CacheError, match="closed"):
        await cache.get("k")


async def test_unopenable_paths_are_clear_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="a-file"):
        await ResponseCache.open(blocker / "cache.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CacheError, match=r"junk\.sqlite"):
        async with ResponseCache(junk):
            pass


async def test_no_secret_reaches_the_database(tmp_path: Path) -> None:
    marker = "sk-MARKER-7f3a9c-do-not-store"
    path = tmp_path / "c.sqlite"
    async with (
        OpenAIDouble(model="m", api_key=marker) as double,
        OpenAIBackend(double.url, api_key=marker, name="remote") as remote,
        ResponseCache(path) as cache,
    ):
        member = Member(remote, cache=cache)
        first = await member.generate(GenerationRequest(prompt="hello there", max_new_tokens=8))
        again = await member.generate(GenerationRequest(prompt="hello there", max_new_tokens=8))
        assert first == again
        assert double.requests == 1
        assert double.last_headers.get("Authorization") == f"Bearer {marker}"
    blob = await asyncio.to_thread(read_all, tmp_path, "c.sqlite")
    assert first[0].text.encode() in blob  # the scan does see stored content
    assert marker.encode() not in blob


def read_all(folder: Path, prefix: str) -> bytes:
    """The bytes of the database and its -wal/-shm files."""
    files = [p for p in folder.iterdir() if p.name.startswith(prefix)]
    assert folder / prefix in files
    return b"".join(p.read_bytes() for p in files)


# --------------------------------------------------------------------------- SIGKILL

_WRITER = """
import asyncio, sys
from ensemble_async.cache import ResponseCache
from ensemble_async.types import Completion

async def main() -> None:
    cache = ResponseCache(sys.argv[1])
    i = 0
    while True:
        c = Completion(text="t" * 200 + str(i), finish_reason="stop", backend="b", latency_s=0.1)
        await cache.put(f"key-{i}", [c])
        print(f"key-{i}", flush=True)
        i += 1

asyncio.run(main())
"""


def test_sigkill_while_writing_keeps_every_committed_entry(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = []
    try:
        for line in child.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 300:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) == 300

    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()

    async def check() -> None:
        async with ResponseCache(path) as cache:
            for key in acknowledged:
                got = await cache.get(key)
                assert got is not None, key
                assert got[0].text.endswith(key.removeprefix("key-"))
            assert await cache.count() >= len(acknowledged)

    asyncio.run(check())
