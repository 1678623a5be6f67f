"""Scheduling overhead: ``Ensemble.map`` against a hand-written aiohttp loop, paired.

Three OpenAI-compatible doubles (vLLM-style, chat endpoint), each in its own process,
answer after ``--latency`` seconds (20 ms).  The same ``--items`` chat prompts go through

* **bare loop** (the baseline): what a user writes in twenty lines: one
  ``aiohttp.ClientSession`` per member, an ``asyncio.Semaphore(64)`` each, one task per
  (item, member) posting the chat body and reading the answer's text; no consensus;
* **Ensemble.map**: 3 members (``OpenAIBackend``, ``Member(concurrency=64)``), policy
  ``exact``, consensus on, ``max_items_in_flight=128`` (so that every member can keep
  its 64 requests in flight while some items wait for their slowest candidate), every
  result consumed.

Both run in one invocation, ``--rounds`` times, alternating which goes first; each
round checks the servers' request counters (every request really went out, once).
Printed per round and as the median: items/s of each, the ratio (target >= 0.9x) and
client CPU microseconds per request of each (``time.process_time`` of this process; the
servers run elsewhere; target: at most 30 us more than the bare loop).

Both clients run under ``ensemble_async.runner.run``, as the CLI does: uvloop's event
loop when uvloop is installed (``--loop asyncio`` forces the standard one), and the
garbage collector tuned for a client (``ENSEMBLE_ASYNC_GC=default`` leaves it alone);
the library's JSON goes through orjson when it is installed (``ENSEMBLE_ASYNC_JSON=json``
forces the standard library).  The header says which were used, so what each one buys
is measured by running the bench with and without it.

    python bench/overhead.py                          # N = 20,000, 3 rounds
    python bench/overhead.py --items 2000 --rounds 5
    python bench/overhead.py --profile prof.out       # cProfile of one Ensemble.map run
    python bench/overhead.py --layers --items 6000    # where the time goes, layer by layer

``--layers`` measures client CPU per request four times over, adding one layer each
time: the bare loop; the adapter (``OpenAIBackend.generate`` under the same
semaphores); the member (``Member.generate``: admission, retries, breaker, stats); the
whole ``Ensemble.map`` (fan-out, consensus, results).  The differences are each
layer's share.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from ensemble_async import Ensemble, GenerationRequest, Member
from ensemble_async.backend import Backend
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.jsonio import JSON_LIBRARY
from ensemble_async.runner import EVENT_LOOP, LoopName, run
from ensemble_async.types import ChatMessage

MEMBERS = 3
PER_MEMBER = 64
MAX_TOKENS = 16


# -- the doubles, each in its own process -----------------------------------------------


def _serve(latency: float, conn: Connection) -> None:
    async def main() -> None:
        from ensemble_async.testing.openai_double import OpenAIDouble

        double = OpenAIDouble(latency=latency, history=1)
        url = await double.start()
        conn.send(url)
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv)) != "stop":
            if command == "count":
                conn.send(double.requests)
        await double.stop()

    asyncio.run(main())


class Doubles:
    def __init__(self, latency: float) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(MEMBERS):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(latency, there), daemon=True)
            proc.start()
            self.conns.append(here)
            self.procs.append(proc)
        self.urls: list[str] = [c.recv() for c in self.conns]

    def counts(self) -> list[int]:
        for conn in self.conns:
            conn.send("count")
        return [int(conn.recv()) for conn in self.conns]

    def stop(self) -> None:
        for conn in self.conns:
            conn.send("stop")
        for proc in self.procs:
            proc.join(10)


# -- the two clients -----------------------------------------------------------------------


def prompt(i: int) -> str:
    return f"Write one short sentence about topic number {i}."


async def bare_loop(urls: list[str], items: int) -> int:
    """The baseline, as a user would write it (returns the answers received)."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for _ in urls]
    gates = [asyncio.Semaphore(PER_MEMBER) for _ in urls]
    got = 0

    async def ask(m: int, i: int) -> None:
        nonlocal got
        body = {
            "model": "double-model",
            "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        async with (
            gates[m],
            sessions[m].post(f"{urls[m]}/v1/chat/completions", json=body) as r,
        ):
            r.raise_for_status()
            data = await r.json()
        if isinstance(data["choices"][0]["message"]["content"], str):
            got += 1

    try:
        await asyncio.gather(*(ask(m, i) for i in range(items) for m in range(len(urls))))
    finally:
        for session in sessions:
            await session.close()
    return got


async def _gated(
    callers: list[Backend | Member], items: int, close: list[Callable[[], Awaitable[None]]]
) -> int:
    """The bare loop's shape (a semaphore of 64 per member, a task per request, all
    created up front) around ``caller.generate``; returns the completions received."""
    gates = [asyncio.Semaphore(PER_MEMBER) for _ in callers]

    async def ask(m: int, i: int) -> int:
        request = GenerationRequest(
            messages=(ChatMessage("user", prompt(i)),), max_new_tokens=MAX_TOKENS
        )
        async with gates[m]:
            return len(await callers[m].generate(request))

    try:
        got = await asyncio.gather(*(ask(m, i) for i in range(items) for m in range(len(callers))))
    finally:
        for closer in close:
            await closer()
    return sum(got)


async def adapters_only(urls: list[str], items: int) -> int:
    """Layer 1: the bare loop with ``OpenAIBackend.generate`` in place of the post."""
    backends = [OpenAIBackend(url, model="double-model", mode="chat") for url in urls]
    return await _gated(list(backends), items, [b.aclose for b in backends])


async def members_only(urls: list[str], items: int) -> int:
    """Layer 2: ``Member.generate`` (admission, retries, breaker, stats) over the adapter;
    behind the same gates, so the member's limiter never queues (as in an ensemble,
    whose item window keeps it so); its slot is still taken and released."""
    members = [
        Member(OpenAIBackend(url, model="double-model", mode="chat"), concurrency=PER_MEMBER)
        for url in urls
    ]
    return await _gated(list(members), items, [m.aclose for m in members])


LAYERS: list[tuple[str, Callable[[list[str], int], Coroutine[Any, Any, int]]]] = []


async def ensemble_map(urls: list[str], items: int) -> int:
    """The library (returns the candidates received)."""
    members = [
        Member(OpenAIBackend(url, model="double-model", mode="chat"), concurrency=PER_MEMBER)
        for url in urls
    ]
    requests = (
        GenerationRequest(messages=(ChatMessage("user", prompt(i)),), max_new_tokens=MAX_TOKENS)
        for i in range(items)
    )
    got = 0
    # Each member keeps up to 64 requests in flight, as each semaphore of the bare loop
    # does; the item window is twice that, so that an item waiting for its slowest
    # candidate does not hold back the other members (the members' limits bound the
    # requests, the window only the items held in memory).
    window = 2 * PER_MEMBER
    async with Ensemble(members, policy="exact", max_items_in_flight=window) as ens:
        async for result in ens.map(requests):
            got += sum(c.status == "ok" for c in result.candidates)
    return got


LAYERS += [
    ("bare aiohttp loop", bare_loop),
    ("+ adapter (OpenAIBackend)", adapters_only),
    ("+ member (Member.generate)", members_only),
    ("+ ensemble (Ensemble.map)", ensemble_map),
]

# -- measuring -----------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    items: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.items / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / (self.items * MEMBERS) * 1e6


def measure(
    name: str,
    client: Callable[[list[str], int], Coroutine[Any, Any, int]],
    doubles: Doubles,
    items: int,
    loop: LoopName,
) -> Outcome:
    before = doubles.counts()
    wall, cpu = time.perf_counter(), time.process_time()
    answers = run(client(doubles.urls, items), loop=loop)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    sent = [a - b for a, b in zip(doubles.counts(), before, strict=True)]
    if answers != items * MEMBERS or any(s != items for s in sent):
        raise SystemExit(f"{name}: {answers} answers, servers saw {sent} (want {items} each)")
    return Outcome(name, items, wall, cpu)


def layers(doubles: Doubles, args: argparse.Namespace) -> None:
    """Client CPU microseconds per request with one more layer each time, ``--rounds``
    times interleaved; prints the median of each and what each layer adds."""
    cpu: dict[str, list[float]] = {name: [] for name, _ in LAYERS}
    for _ in range(args.rounds):
        for name, client in LAYERS:
            cpu[name].append(measure(name, client, doubles, args.items, args.loop).cpu_us)
    print(f"{'layer':<30} {'cpu us/req':>10} {'adds':>8}")
    previous = None
    for name, _ in LAYERS:
        value = statistics.median(cpu[name])
        adds = "" if previous is None else f"{value - previous:>+8.1f}"
        print(f"{name:<30} {value:>10.1f} {adds:>8}")
        previous = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--profile", metavar="FILE", help="profile one Ensemble.map run")
    parser.add_argument(
        "--layers",
        action="store_true",
        help="client CPU per request, layer by layer (where the time goes)",
    )
    args = parser.parse_args()
    doubles = Doubles(args.latency)
    try:
        # warm both paths (imports, connection pools, server JIT-free warm-up)
        measure("warm-up", bare_loop, doubles, 200, args.loop)
        measure("warm-up", ensemble_map, doubles, 200, args.loop)
        if args.layers:
            layers(doubles, args)
            return 0
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            out = measure("Ensemble.map", ensemble_map, doubles, args.items, args.loop)
            profiler.disable()
            profiler.dump_stats(args.profile)
            print(f"profiled: {out.rate:,.0f} items/s, {out.cpu_us:.1f} us/request")
            return 0
        loop_name = EVENT_LOOP if args.loop == "auto" else args.loop
        print(
            f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"event loop {loop_name}, JSON {JSON_LIBRARY}, GC "
            f"{'default' if os.environ.get('ENSEMBLE_ASYNC_GC') == 'default' else 'tuned'}; "
            f"{MEMBERS} doubles in their own "
            f"processes, {args.latency * 1000:.0f} ms; N = {args.items:,}, {PER_MEMBER} "
            "in flight per member"
        )
        print(
            f"{'round':<6} {'bare items/s':>12} {'map items/s':>12} {'ratio':>6} "
            f"{'bare us/req':>11} {'map us/req':>11} {'extra us':>9}"
        )
        ratios: list[float] = []
        extra: list[float] = []
        bare_rates: list[float] = []
        map_rates: list[float] = []
        for r in range(args.rounds):
            pair: dict[str, Outcome] = {}
            order = [("bare", bare_loop), ("map", ensemble_map)]
            for name, client in order if r % 2 == 0 else order[::-1]:
                pair[name] = measure(name, client, doubles, args.items, args.loop)
            bare, mapped = pair["bare"], pair["map"]
            ratios.append(mapped.rate / bare.rate)
            extra.append(mapped.cpu_us - bare.cpu_us)
            bare_rates.append(bare.rate)
            map_rates.append(mapped.rate)
            print(
                f"{r + 1:<6} {bare.rate:>12,.0f} {mapped.rate:>12,.0f} {ratios[-1]:>5.2f}x "
                f"{bare.cpu_us:>11.1f} {mapped.cpu_us:>11.1f} {extra[-1]:>9.1f}"
            )
        ratio, more = statistics.median(ratios), statistics.median(extra)
        print(
            f"{'median':<6} {statistics.median(bare_rates):>12,.0f} "
            f"{statistics.median(map_rates):>12,.0f} {ratio:>5.2f}x {'':>11} {'':>11} {more:>9.1f}"
        )
        print(
            f"targets: Ensemble.map >= 0.9x the bare loop: {ratio:.2f}x; "
            f"<= 30 us more CPU per request: {more:.1f} us"
        )
        return 0 if ratio >= 0.9 and more <= 30 else 1
    finally:
        doubles.stop()


if __name__ == "__main__":
    sys.exit(main())
