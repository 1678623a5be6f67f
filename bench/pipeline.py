"""Pipeline throughput (kept examples per minute) against the HTTP test doubles.

Every double answers after ``--latency`` seconds (service time per request), with fake
Ensemble-Instruct completions (``EIResponder``). Two runs, side by side:

* ``pipeline``: the streaming pipeline with its default concurrency;
* ``sequential``: the same pipeline with every stage at concurrency 1 and a step-1 window
  of 1 -- one request at a time per stage, as the reference's blocking loop works.

    python bench/pipeline.py                 # defaults: latency 20 ms, 60 + 40 instructions
    python bench/pipeline.py --latency 0.05 --io 100 --o 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
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
from ensemble_async.testing.ei_responder import EIResponder
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble


class MemorySink:
    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.rejects = 0

    def has(self, id: str) -> bool:
        return id in self.ids

    def write(self, record: dict[str, Any]) -> bool:
        if record["id"] in self.ids:
            return False
        self.ids.add(record["id"])
        return True

    def reject(self, record: dict[str, Any]) -> bool:
        self.rejects += 1
        return True


async def one_run(settings: PipelineSettings, latency: float) -> tuple[PipelineSummary, float]:
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(
            TGIDouble(responder=EIResponder("writer"), latency=latency)
        )
        a1 = await stack.enter_async_context(
            TGIDouble(responder=EIResponder("a1"), latency=latency)
        )
        a2 = await stack.enter_async_context(
            OpenAIDouble(responder=EIResponder("a2"), latency=latency)
        )

        def member(backend: Any) -> Member:
            return Member(backend, concurrency=64, retry=RetryPolicy.never())

        writer = member(TGIBackend(w.url, name="writer"))
        answerers = [
            member(TGIBackend(a1.url, name="a1")),
            member(OpenAIBackend(a2.url, name="a2", model="double-model")),
        ]
        for m in (writer, *answerers):
            stack.push_async_callback(m.aclose)
        pipeline = Pipeline(
            writer=writer,
            answerers=answerers,
            seeds=load_seed_tasks(),
            settings=settings,
            sink=MemorySink(),
        )
        started = time.perf_counter()
        summary = await pipeline.run()
        return summary, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per request")
    parser.add_argument("--io", type=int, default=60, help="type-A instructions to accept")
    parser.add_argument("--o", type=int, default=40, help="type-B instructions to accept")
    parser.add_argument("--preset", default="default", choices=("default", "paper"))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    targets = {"input_output": args.io, "output": args.o}
    base = PipelineSettings.preset(args.preset, targets=targets)
    runs = {
        "pipeline": base,
        "sequential": PipelineSettings.preset(
            args.preset,
            targets=targets,
            instruction_window=1,
            instance_concurrency=1,
            answer_concurrency=1,
            queue_size=1,
        ),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, settings in runs.items():
        summary, wall = asyncio.run(one_run(settings, args.latency))
        kept = summary.records_written
        results[name] = {
            "records": kept,
            "wall_s": round(wall, 3),
            "examples_per_min": round(kept / wall * 60, 1),
            "attempts": sum(summary.attempts.values()),
        }
    print(f"latency {args.latency * 1000:.0f} ms/request, targets {targets}, preset {args.preset}")
    print(f"{'run':<12}{'records':>9}{'wall s':>9}{'ex/min':>10}{'step-1 tries':>14}")
    for name, r in results.items():
        print(
            f"{name:<12}{r['records']:>9}{r['wall_s']:>9.2f}"
            f"{r['examples_per_min']:>10.0f}{r['attempts']:>14}"
        )
    speedup = results["pipeline"]["examples_per_min"] / results["sequential"]["examples_per_min"]
    print(f"speed-up: {speedup:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
