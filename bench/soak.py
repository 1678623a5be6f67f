"""Soak: the whole pipeline against faulty HTTP test doubles, at high concurrency.

A TGI double writes (steps 1-2); a TGI double and a vLLM-style double answer (step 4);
all three speak with fake Ensemble-Instruct completions (``EIResponder``) and fail a
share of their generation requests (``--fault-rate``) with a seeded mix of 429 (with
Retry-After), 503, 424, connection resets, malformed JSON, truncated bodies and a few
hangs (cut by the per-attempt timeout).  Members retry with short backoffs.

Prints throughput, the faults the doubles injected (by kind), the members' retries and
final failures, and the accounting that must hold: every instance accepted at step 3
ends as a record or a consensus reject (``lost`` must be 0).  RSS is read from
/proc/self/statm before and after (Linux).

    python bench/soak.py                          # defaults: ~30-60 s on a 2-core VM
    python bench/soak.py --io 1200 --o 800 --fault-rate 0.2 --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.member import Member
from ensemble_async.pipeline import Pipeline, PipelineSummary
from ensemble_async.presets import PipelineSettings
from ensemble_async.retry import RetryPolicy
from ensemble_async.seedtasks import load_seed_tasks
from ensemble_async.sink import MemoryRecordSink
from ensemble_async.testing.ei_responder import EIResponder
from ensemble_async.testing.faults import Fault, FaultPlan
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble

FAULTS = (
    *[Fault.status(429, retry_after=0.01)] * 2,
    *[Fault.status(503)] * 2,
    *[Fault.status(424)] * 2,
    *[Fault.reset()] * 2,
    *[Fault.malformed()] * 2,
    *[Fault.truncate()] * 2,
    Fault.hang(),
)


class CountingSink(MemoryRecordSink):
    """The in-memory sink, with its counts in the shape this report prints."""

    @property
    def ids(self) -> set[str]:
        return {r.id for r in self.records}

    @property
    def record_calls(self) -> int:
        return len(self.records) + self.duplicates

    @property
    def rejects_by_stage(self) -> Counter[str]:
        return Counter(r.stage for r in self.rejects)


def rss_mib() -> float:
    """Resident set size of this process, from /proc/self/statm (0 where absent)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    policy = RetryPolicy(
        max_attempts=args.max_attempts,
        initial_backoff_s=0.005,
        max_backoff_s=0.2,
        max_total_s=60.0,
        attempt_timeout_s=args.attempt_timeout,
    )
    plans = {
        name: FaultPlan(args.fault_rate, FAULTS, seed=args.seed + k)
        for k, name in enumerate(("writer", "a1", "a2"))
    }
    settings = PipelineSettings.preset(
        args.preset,
        targets={"input_output": args.io, "output": args.o},
        seed=args.seed,
        instance_concurrency=args.concurrency,
        answer_concurrency=args.concurrency,
        queue_size=args.concurrency,
        instruction_window=args.window,
    )
    sink = CountingSink()
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(
            TGIDouble(responder=EIResponder("writer"), latency=args.latency, faults=plans["writer"])
        )
        a1 = await stack.enter_async_context(
            TGIDouble(responder=EIResponder("a1"), latency=args.latency, faults=plans["a1"])
        )
        a2 = await stack.enter_async_context(
            OpenAIDouble(responder=EIResponder("a2"), latency=args.latency, faults=plans["a2"])
        )

        def member(backend: TGIBackend | OpenAIBackend) -> Member:
            return Member(backend, concurrency=args.concurrency, retry=policy)

        writer = member(TGIBackend(w.url, name="writer"))
        answerers = [
            member(TGIBackend(a1.url, name="a1")),
            member(OpenAIBackend(a2.url, name="a2", model="double-model")),
        ]
        for m in (writer, *answerers):
            await stack.enter_async_context(m)
        pipeline = Pipeline(
            writer=writer,
            answerers=answerers,
            seeds=load_seed_tasks(),
            settings=settings,
            sink=sink,
        )
        rss_start = rss_mib()
        started = time.perf_counter()
        summary: PipelineSummary = await pipeline.run()
        wall = time.perf_counter() - started
        rss_end = rss_mib()
        snaps = {m.name: m.snapshot() for m in (writer, *answerers)}
        received = {"writer": w.stats.requests, "a1": a1.stats.requests, "a2": a2.requests}

    accepted3 = summary.counts["instances"]["accepted"]
    settled = (
        sink.record_calls
        + sink.rejects_by_stage["consensus"]
        + summary.counts["consensus"]["skipped"]
        + summary.counts["answers"]["deferred"]
    )
    injected: Counter[str] = Counter()
    for plan in plans.values():
        injected.update(plan.by_kind)
    requests = sum(received.values())
    return {
        "wall_s": round(wall, 2),
        "requests": requests,
        "requests_per_s": round(requests / wall, 1),
        "items_accepted_step3": accepted3,
        "items_per_s": round(accepted3 / wall, 1),
        "records": len(sink.ids),
        "records_per_s": round(len(sink.ids) / wall, 1),
        "duplicate_ids": sink.duplicates,
        "rejects": dict(sink.rejects_by_stage),
        "deferred": summary.deferred,
        "lost": accepted3 - settled,
        "faults_injected": sum(injected.values()),
        "faults_by_kind": dict(sorted(injected.items())),
        "fault_share": round(sum(injected.values()) / max(1, requests), 3),
        "retries": {name: s["retried"] for name, s in snaps.items()},
        "failed_after_retries": {name: s["failed"] for name, s in snaps.items()},
        "errors_by_class": {name: s["errors"] for name, s in snaps.items()},
        "cancelled": {name: s["cancelled"] for name, s in snaps.items()},
        "unaccounted_attempts": {
            # Each request a double received was answered, faulted, or belonged to a
            # call the pipeline cancelled (step-1 attempts beyond the target): the
            # received requests beyond answers and faults must fit in the cancelled.
            name: _unaccounted(
                received[name] - snaps[name]["done"] - plans[name].injected,
                snaps[name]["cancelled"],
            )
            for name in received
        },
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_end": round(rss_end, 1),
        "exhausted": dict(summary.exhausted),
    }


def _unaccounted(extra: int, cancelled: int) -> int:
    """Requests neither answered, faulted nor explained by a cancelled call."""
    return -extra if extra < 0 else max(0, extra - cancelled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--io", type=int, default=1800, help="type-A instructions to accept")
    parser.add_argument("--o", type=int, default=1200, help="type-B instructions to accept")
    parser.add_argument("--fault-rate", type=float, default=0.15)
    parser.add_argument("--latency", type=float, default=0.005, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=64, help="steps 2 and 4, members")
    parser.add_argument("--window", type=int, default=32, help="step-1 attempts in flight")
    parser.add_argument("--max-attempts", type=int, default=8)
    parser.add_argument("--attempt-timeout", type=float, default=0.5)
    parser.add_argument("--preset", default="default", choices=("default", "paper"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    r = asyncio.run(soak(args))
    print(
        f"soak: targets io={args.io} o={args.o}, fault rate {args.fault_rate:.0%}, "
        f"concurrency {args.concurrency}, latency {args.latency * 1000:.0f} ms"
    )
    print(
        f"wall {r['wall_s']} s | requests {r['requests']} ({r['requests_per_s']}/s) | "
        f"items {r['items_accepted_step3']} ({r['items_per_s']}/s) | "
        f"records {r['records']} ({r['records_per_s']}/s)"
    )
    print(f"faults injected {r['faults_injected']} ({r['fault_share']:.1%}): {r['faults_by_kind']}")
    print(f"retries {r['retries']} | failed after retries {r['failed_after_retries']}")
    print(f"rejects {r['rejects']} | duplicate ids {r['duplicate_ids']}")
    print(
        f"lost {r['lost']} | unaccounted attempts {r['unaccounted_attempts']} "
        f"| calls cancelled by the pipeline {r['cancelled']}"
    )
    print(f"RSS {r['rss_mib_start']} MiB -> {r['rss_mib_end']} MiB")
    if r["exhausted"]:
        print(f"targets missed: {r['exhausted']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2), encoding="utf-8")
    bad = r["lost"] != 0 or any(r["unaccounted_attempts"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
