"""Benchmark: one coordinator driving a fleet of replicas (3 members x 32 replicas).

Starts ``--members * --replicas`` TGI test doubles (96 by default) with ``--latency``
service time (20 ms), spread over ``--procs`` server processes (this script with
``--serve``), so the client process measured here runs nothing but the client. Then:

1. **raw aiohttp** (the baseline): one pooled session, ``--in-flight * --members``
   concurrent workers posting the same ``/generate`` body to the endpoints in turn;
   then the same loop over the library's own HTTP client (``wire.Origin``), to show
   what the library costs beyond its transport;
2. **Ensemble.map**: ``--items`` items through an :class:`~ensemble_async.Ensemble` of
   ``--members`` members, each one ``create_backend("tgi", urls=[...32 URLs])`` (a
   :class:`~ensemble_async.replicas.ReplicaSet`), ``--in-flight`` items at a time (so the
   same number of requests in flight as the baseline);
3. **faults**: the same run again, where at a third of the items 4 replicas die (their
   servers stop) and 2 others become 5x slower: every item must still come back with
   every member's candidate (0 items lost), and the slow replicas should get
   proportionally fewer requests from then on.

Printed for each: requests/s (and the ratio to the baseline, target >= 0.8x), client CPU
microseconds per request (``time.process_time`` of this process only; target <= 100 us
for Ensemble.map), and how even the load is (max/min requests per replica).

Run: ``python bench/fleet.py`` (``--items 5000`` for a quick run).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp

from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.pipeline import Pipeline
from ensemble_async.presets import PipelineSettings
from ensemble_async.registry import create_backend
from ensemble_async.replicas import ReplicaSet, replica_label
from ensemble_async.runner import run
from ensemble_async.seedtasks import load_seed_tasks
from ensemble_async.sink import MemoryRecordSink
from ensemble_async.templates import EOS
from ensemble_async.testing.ei_responder import EIResponder
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.wire import Answer, Origin, build_head

BODY = {"inputs": "item", "parameters": {"max_new_tokens": 16, "do_sample": False}}


# -- the server side: many doubles in one process, driven by commands on stdin -----------


class ZipfEIResponder(EIResponder):
    """The Ensemble-Instruct double, writing its step-1 instructions from the novelty
    bench's generator (a 30,000-word Zipf vocabulary with instruction-like openings)
    instead of the test double's 200-word list: with so few words the novelty filter's
    index cannot prune, and a pipeline of 100,000 instructions would measure that
    instead of the client."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        from novelty import InstructionGenerator  # bench/novelty.py, beside this file

        self.writer = InstructionGenerator(seed=7)

    def _instruction(self, rng: random.Random) -> str:
        if rng.random() < self.bad_rate:
            return super()._instruction(rng)  # the test double's defects
        self.writer.rng.seed(rng.random())  # the same prompt and seed, the same text
        text = self.writer.fresh()
        return f" {text} {EOS}\n99. {self.writer.fresh()} {EOS}"


async def serve(count: int, latency: float, names: Sequence[str] = (), vocab: str = "zipf") -> None:
    """Start ``count`` doubles, print their URLs, then obey ``kill I`` / ``slow I F``.
    ``names``: double ``i`` answers like the Ensemble-Instruct LM ``names[i]``, writing
    instructions from a Zipf vocabulary (``vocab="zipf"``) or the test double's words."""
    kind = ZipfEIResponder if vocab == "zipf" else EIResponder
    doubles = [
        TGIDouble(
            latency=latency,
            max_concurrent_requests=512,
            responder=kind(names[i]) if names else None,
        )
        for i in range(count)
    ]
    for double in doubles:
        await double.start()
    print(" ".join(d.url for d in doubles), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "kill":
            await doubles[int(line[1])].stop()
        elif line[0] == "slow":
            doubles[int(line[1])].latency *= float(line[2])
        elif line[0] == "stats":
            print(json.dumps([d.stats.requests for d in doubles]), flush=True)
    for double in doubles:
        await double.stop()


@dataclass
class Fleet:
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # url -> (proc, index)

    @classmethod
    def start(
        cls,
        total: int,
        procs: int,
        latency: float,
        names: Sequence[str] = (),
        vocab: str = "zipf",
    ) -> Fleet:
        fleet = cls()
        per = -(-total // procs)
        for p in range(procs):
            count = min(per, total - p * per)
            mine = ["--names", ",".join(names[p * per : p * per + count])] if names else []
            mine += ["--vocab", vocab]
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    str(count),
                    "--latency",
                    str(latency),
                    *mine,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            fleet.procs.append(proc)
        for p, proc in enumerate(fleet.procs):
            assert proc.stdout is not None
            urls = proc.stdout.readline().split()
            fleet.urls += urls
            fleet.where += [(p, i) for i in range(len(urls))]
        return fleet

    def command(self, url: str, *words: object) -> None:
        p, i = self.where[self.urls.index(url)]
        stdin = self.procs[p].stdin
        assert stdin is not None
        stdin.write(" ".join(map(str, (words[0], i, *words[1:]))) + "\n")
        stdin.flush()

    def stop(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()


# -- the client side ------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    requests: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.requests * 1e6


async def raw_aiohttp(urls: Sequence[str], requests: int, concurrency: int) -> Outcome:
    """The baseline: the least a client can do to send these requests."""
    body = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}
    counter = iter(range(requests))
    targets = [f"{u}/generate" for u in urls]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in counter:
                async with session.post(targets[i % len(targets)], data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Outcome("raw aiohttp", requests, wall, cpu)


class Captured:
    """Requests as sent, (URL, body), kept in one byte buffer and two flat arrays: no
    object per request, so holding 400,000 of them adds nothing for the garbage
    collector to scan while the pipeline runs."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self._url_index: dict[str, int] = {}
        self._blob = bytearray()
        self._ends = array.array("q")
        self._which = array.array("l")

    def add(self, url: str, body: bytes) -> None:
        index = self._url_index.get(url)
        if index is None:
            index = self._url_index[url] = len(self.urls)
            self.urls.append(url)
        self._blob += body
        self._ends.append(len(self._blob))
        self._which.append(index)

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        start = 0
        for end, which in zip(self._ends, self._which, strict=True):
            yield self.urls[which], bytes(self._blob[start:end])
            start = end


async def raw_replay(captured: Captured, concurrency: int) -> Outcome:
    """The baseline for the pipeline: its own requests (same URLs, same bodies, in the
    order it sent them) posted by the plain aiohttp loop, so that the servers do the
    same work for both clients."""
    headers = {"Content-Type": "application/json"}
    todo = iter(captured)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for url, body in todo:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Outcome("raw aiohttp, same requests", len(captured), wall, cpu)


@contextlib.contextmanager
def capturing(into: Captured) -> Iterator[None]:
    """Record every request the library's HTTP client sends (well under 1 us each)."""
    original = Origin.request

    async def request(
        self: Origin, head: bytes, body: bytes, limit: int, error_limit: int
    ) -> Answer:
        into.add(f"{self.scheme}://{self.host_header}{head.split(b' ', 2)[1].decode()}", body)
        return await original(self, head, body, limit, error_limit)

    Origin.request = request  # type: ignore[method-assign]
    try:
        yield
    finally:
        Origin.request = original  # type: ignore[method-assign]


async def raw_wire(urls: Sequence[str], requests: int, concurrency: int) -> Outcome:
    """The same loop over the library's own HTTP client (``wire.Origin``) and nothing
    else: what is left of the library's cost once its transport is set aside."""
    body = json.dumps(BODY).encode()
    origins = [Origin(u) for u in urls]
    heads = [
        build_head(
            "POST", o.target("/generate"), o.host_header, {"Content-Type": "application/json"}
        )
        for o in origins
    ]
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            k = i % len(origins)
            status, _, _ = await origins[k].request(heads[k], body, 1 << 20, 8192)
            assert status == 200, status

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        for origin in origins:
            await origin.aclose()
    return Outcome("raw wire (lean client)", requests, wall, cpu)


async def prompts(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"item {i}"


@dataclass
class MapRun:
    outcome: Outcome
    per_replica: dict[str, int]
    lost: int
    failed_candidates: int
    after_fault: dict[str, int]


async def ensemble_map(
    fleet: Fleet, args: argparse.Namespace, *, faults: bool, name: str
) -> MapRun:
    groups = [fleet.urls[m * args.replicas : (m + 1) * args.replicas] for m in range(args.members)]
    backends = [
        create_backend("tgi", urls=urls, name=f"m{m}", timeout=30) for m, urls in enumerate(groups)
    ]
    sets = [b for b in backends if isinstance(b, ReplicaSet)]
    members = [Member(b, concurrency=args.in_flight) for b in backends]
    killed, slowed = fault_plan(groups)
    fault_at = args.items // 3 if faults else -1
    before: dict[str, int] = {}
    done = lost = failed = 0
    wall, cpu = time.perf_counter(), time.process_time()
    async with Ensemble(members, max_items_in_flight=args.in_flight) as ens:
        async for result in ens.map(prompts(args.items)):
            done += 1
            bad = [c for c in result.candidates if c.status in ("failed", "circuit_open")]
            failed += len(bad)
            lost += not result.candidates or len(bad) == len(result.candidates)
            if done == fault_at:
                for url in killed:
                    fleet.command(url, "kill")
                for url in slowed:
                    fleet.command(url, "slow", 5)
                before = _per_replica(sets)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_replica = _per_replica(sets)
    after = {k: per_replica[k] - before.get(k, 0) for k in per_replica} if faults else {}
    for url in killed if faults else ():
        after.pop(replica_label(url), None)
    requests = sum(per_replica.values())
    return MapRun(Outcome(name, requests, wall, cpu), per_replica, lost, failed, after)


async def pipeline_run(
    fleet: Fleet, args: argparse.Namespace, captured: Captured | None = None
) -> tuple[Outcome, int, str]:
    """The generate pipeline with a writer and two answerers of ``--replicas`` replicas
    each: (requests/s and CPU per request, records kept, load spread over replicas).
    ``captured``: filled with the requests sent."""
    groups = [fleet.urls[m * args.replicas : (m + 1) * args.replicas] for m in range(3)]
    names = ["writer", "a1", "a2"]
    backends = [
        create_backend("tgi", urls=urls, name=name, timeout=30)
        for name, urls in zip(names, groups, strict=True)
    ]
    sets = [b for b in backends if isinstance(b, ReplicaSet)]
    members = [Member(b, concurrency=args.in_flight) for b in backends]
    half = args.pipeline // 2
    # fleet-sized stage concurrency: the defaults (8 / 16 / 16) suit a few servers and
    # would leave 96 replicas idle; the window is part of the output's identity, so the
    # records differ from a default run's, not from run to run
    settings = dataclasses.replace(
        PipelineSettings.preset(
            "default", targets={"input_output": args.pipeline - half, "output": half}
        ),
        instruction_window=args.window,
        instance_concurrency=args.stage_concurrency,
        answer_concurrency=args.stage_concurrency,
        queue_size=2 * args.stage_concurrency,
    )
    sink = MemoryRecordSink()
    watcher: asyncio.Task[None] | None = None
    try:
        for m in members:
            await m.start()
        pipeline = Pipeline(
            writer=members[0],
            answerers=members[1:],
            seeds=load_seed_tasks(),
            settings=settings,
            sink=sink,
        )
        watcher = (
            asyncio.create_task(watch(members, sets, sink, args.watch)) if args.watch else None
        )
        with capturing(captured) if captured is not None else contextlib.nullcontext():
            wall, cpu = time.perf_counter(), time.process_time()
            summary = await pipeline.run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        if watcher is not None:
            watcher.cancel()
        for m in members:
            await m.aclose()
    per_replica = _per_replica(sets)
    requests = sum(per_replica.values())
    outcome = Outcome("pipeline (generate)", requests, wall, cpu)
    return outcome, summary.records_written, spread(per_replica)


async def watch(
    members: Sequence[Member], sets: Sequence[ReplicaSet], sink: MemoryRecordSink, every: float
) -> None:
    """Every ``every`` seconds, one line on stderr: records so far, the client's CPU share,
    and per member its requests in flight, admission limit, retries and errors, and
    replicas in service (to see why a run slows down, if it does)."""
    wall, cpu = time.perf_counter(), time.process_time()
    while True:
        await asyncio.sleep(every)
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        share = (now_cpu - cpu) / max(1e-9, now_wall - wall)
        wall, cpu = now_wall, now_cpu
        parts = [
            f"{m.name}: {m.stats.in_flight} in flight, limit {m.limiter.limit}, "
            f"{m.stats.retried} retried, errors {dict(m.stats.errors)}, "
            f"{sum(r.in_service for r in s.replicas)}/{len(s.replicas)} in service"
            for m, s in zip(members, sets, strict=True)
        ]
        print(
            f"[watch] {len(sink.records)} records, client CPU {share:.0%}; " + "; ".join(parts),
            file=sys.stderr,
            flush=True,
        )


def fault_plan(groups: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """The 4 replicas that die and the 2 that slow down (distinct, spread over members)."""

    def pick(m: int, r: int) -> str:
        group = groups[m % len(groups)]
        return group[r % len(group)]

    killed = [pick(0, 1), pick(1, 2), pick(2, 3), pick(0, 5)]
    slowed = [pick(1, 7), pick(2, 9)]
    assert len(set(killed + slowed)) == 6, "too few replicas for the fault plan"
    return killed, slowed


def _per_replica(sets: Sequence[ReplicaSet]) -> dict[str, int]:
    return {r.label: r.requests for s in sets for r in s.replicas}


def spread(counts: dict[str, int]) -> str:
    values = [v for v in counts.values() if v > 0] or [0]
    return f"max/min {max(values) / max(1, min(values)):.2f} ({min(values)}..{max(values)})"


def row(outcome: Outcome, base: Outcome | None) -> str:
    ratio = f"{outcome.rate / base.rate:>6.2f}x" if base else f"{'1.00x':>7}"
    return (
        f"{outcome.name:<28} {outcome.requests:>9,} {outcome.rate:>9,.0f} {ratio} "
        f"{outcome.cpu_us:>10.1f}"
    )


async def client(args: argparse.Namespace) -> int:
    total = args.members * args.replicas
    fleet = Fleet.start(total, args.procs, args.latency)
    try:
        print(
            f"{args.members} members x {args.replicas} replicas = {total} TGI doubles in "
            f"{args.procs} server processes, {args.latency * 1000:.0f} ms service time; "
            f"{args.items:,} items, {args.in_flight} items in flight"
        )
        requests = args.items * args.members
        base = await raw_aiohttp(fleet.urls, requests, args.in_flight * args.members)
        print(f"{'client':<28} {'requests':>9} {'req/s':>9} {'vs raw':>7} {'cpu us/req':>10}")
        print(row(base, None))
        lean = await raw_wire(fleet.urls, requests, args.in_flight * args.members)
        print(row(lean, base))
        clean = await ensemble_map(fleet, args, faults=False, name="Ensemble.map")
        print(row(clean.outcome, base))
        faulty = await ensemble_map(fleet, args, faults=True, name="Ensemble.map + faults")
        print(row(faulty.outcome, base))
        print(f"\nload per replica, clean run: {spread(clean.per_replica)}")
        print(
            f"faults run: {faulty.lost} items lost, {faulty.failed_candidates} failed "
            f"candidates (of {args.items * args.members})"
        )
        groups = [
            fleet.urls[m * args.replicas : (m + 1) * args.replicas] for m in range(args.members)
        ]
        slow = [replica_label(u) for u in fault_plan(groups)[1]]
        healthy = [v for k, v in faulty.after_fault.items() if k not in slow]
        median = statistics.median(healthy) if healthy else 0
        slow_counts = [faulty.after_fault.get(k, 0) for k in slow]
        share = statistics.mean(slow_counts) / max(1.0, median)
        print(
            f"after the faults: healthy replicas got a median of {median:.0f} requests, "
            f"the two 5x-slower ones {slow_counts[0]} and {slow_counts[1]} ({share:.2f}x)"
        )
        if args.pipeline:
            await fleet_pipeline(args)
        ok = (
            clean.outcome.rate >= 0.8 * base.rate
            and clean.outcome.cpu_us <= 100
            and faulty.lost == 0
        )
        print(
            f"targets: >= 0.8x raw aiohttp: {clean.outcome.rate / base.rate:.2f}x; "
            f"<= 100 us/request: {clean.outcome.cpu_us:.0f} us; 0 items lost: {faulty.lost}"
        )
        return 0 if ok else 1
    finally:
        fleet.stop()


async def fleet_pipeline(args: argparse.Namespace) -> None:
    """A fleet of EI-like doubles (writer, a1, a2 x ``--replicas``) and one pipeline run,
    next to a raw aiohttp loop sending as many requests to the same fleet."""
    names = [n for n in ("writer", "a1", "a2") for _ in range(args.replicas)]
    fleet = Fleet.start(len(names), args.procs, args.latency, names, args.vocab)
    try:
        captured = Captured()
        outcome, kept, load = await pipeline_run(fleet, args, captured)
        base = await raw_aiohttp(fleet.urls, outcome.requests, args.in_flight * 3)
        replay = await raw_replay(captured, args.in_flight * 3)
        print(
            f"\npipeline: {args.pipeline:,} instructions asked, {kept:,} records kept, "
            f"{outcome.wall_s:.1f} s"
        )
        print(f"{'client':<28} {'requests':>9} {'req/s':>9} {'vs raw':>7} {'cpu us/req':>10}")
        print(row(base, None))
        print(row(replay, base))
        print(row(outcome, base))
        print(
            f"pipeline vs the same requests replayed: {outcome.rate / replay.rate:.2f}x; "
            f"load per replica: {load}"
        )
    finally:
        fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000, help="items (100000)")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=32, help="replicas per member (32)")
    parser.add_argument("--procs", type=int, default=4, help="server processes (4)")
    parser.add_argument("--latency", type=float, default=0.02, help="service time (0.02 s)")
    parser.add_argument("--in-flight", type=int, default=128, help="items in flight (128)")
    parser.add_argument(
        "--pipeline",
        type=int,
        default=0,
        metavar="N",
        help="also run the generate pipeline for N instructions on an EI-like fleet",
    )
    parser.add_argument(
        "--window", type=int, default=64, help="pipeline: step-1 attempts in flight per kind (64)"
    )
    parser.add_argument(
        "--stage-concurrency",
        type=int,
        default=128,
        help="pipeline: steps 2 and 3 in flight (128)",
    )
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="S",
        help="pipeline: every S seconds print progress, admission limits and errors",
    )
    parser.add_argument(
        "--vocab",
        choices=("zipf", "small"),
        default="zipf",
        help="pipeline: instructions from a 30k-word Zipf vocabulary (default) or the test "
        "double's 200 words",
    )
    parser.add_argument("--names", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        names = args.names.split(",") if args.names else []
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.serve, args.latency, names, args.vocab))
        return 0
    return run(client(args))


if __name__ == "__main__":
    sys.exit(main())
