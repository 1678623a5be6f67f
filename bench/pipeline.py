"""Pipeline throughput (kept examples per minute) against the HTTP test doubles.

Every double answers after ``--latency`` seconds (service time per request), with fake
Ensemble-Instruct completions (``EIResponder``). Two runs, side by side:

* ``pipeline``: the streaming pipeline with its default concurrency;
* ``sequential``: the same pipeline with every stage at concurrency 1 and a step-1 window
  of 1 -- one request at a time per stage, as the reference's blocking loop works.

    python bench/pipeline.py                 # defaults: latency 20 ms, 60 + 40 instructions
    python bench/pipeline.py --latency 0.05 --io 100 --o 60
    python bench/pipeline.py --disk          # into a records file, fsynced, as generate does

``--embedded`` runs the same comparison on the two embedded local models (the default
config's roles: SmolLM2-135M-Instruct writes and answers, the Gemma-3-270M base model
answers with in-context demos), with small targets and short generations, no response
cache, models loaded before the clock starts. By default both runs use a step-1 window
of 1, so they do the same work (the same records) and only the concurrency of steps 2
and 4 differs; ``--window N`` gives the pipeline run a wider step-1 window (more
parallel work, different records):

    python bench/pipeline.py --embedded                # 2 + 1 instructions
    python bench/pipeline.py --embedded --io 6 --o 4 --window 4
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
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
from ensemble_async.sink import AsyncRecordWriter, MemoryRecordSink
from ensemble_async.testing.ei_responder import EIResponder
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble


async def one_run(
    settings: PipelineSettings, latency: float, disk: bool = False
) -> tuple[PipelineSummary, float]:
    """One run; ``disk``: into a records file (fsynced, as ``generate`` writes) in a
    temporary folder, else into memory."""
    async with AsyncExitStack() as stack:
        sink: AsyncRecordWriter | MemoryRecordSink = MemoryRecordSink()
        if disk:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            sink = await stack.enter_async_context(
                await AsyncRecordWriter.open(Path(folder) / "records.jsonl")
            )
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
            sink=sink,
        )
        started = time.perf_counter()
        summary = await pipeline.run()
        return summary, time.perf_counter() - started


def embedded_settings(
    preset: str, targets: dict[str, int], concurrency: int, window: int = 1
) -> PipelineSettings:
    """Short generations sized for a CPU; ``concurrency`` for steps 2 and 4, ``window``
    step-1 attempts in flight per kind."""
    base = PipelineSettings.preset(preset)
    return PipelineSettings.preset(
        preset,
        targets=targets,
        max_attempts_factor=5,
        instruction_window=window,
        instance_concurrency=concurrency,
        answer_concurrency=concurrency,
        queue_size=max(1, concurrency),
        instruction_decoding=dataclasses.replace(base.instruction_decoding, max_new_tokens=40),
        instance_decoding=dataclasses.replace(base.instance_decoding, max_new_tokens=96),
        answer_decoding=dataclasses.replace(base.answer_decoding, max_new_tokens=48),
    )


async def embedded_runs(
    runs: dict[str, PipelineSettings],
) -> dict[str, tuple[PipelineSummary, float, int]]:
    """Each run on the same loaded local models (no cache); (summary, wall, tokens)."""
    from ensemble_async.assemble import build_members, embedded_config

    config = embedded_config()
    writer, answerers = build_members(config)
    members = list(dict.fromkeys([writer, *answerers]))
    out: dict[str, tuple[PipelineSummary, float, int]] = {}
    try:
        for m in members:
            await m.start()  # loads the model
        for name, settings in runs.items():
            before = sum(m.stats.snapshot()["completion_tokens"] for m in members)
            pipeline = Pipeline(
                writer=writer,
                answerers=answerers,
                seeds=load_seed_tasks(),
                settings=settings,
                sink=MemoryRecordSink(),
            )
            started = time.perf_counter()
            summary = await pipeline.run()
            wall = time.perf_counter() - started
            tokens = sum(m.stats.snapshot()["completion_tokens"] for m in members) - before
            out[name] = (summary, wall, tokens)
    finally:
        for m in members:
            await m.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per request")
    parser.add_argument(
        "--io", type=int, default=None, help="type-A instructions to accept (60; embedded 2)"
    )
    parser.add_argument(
        "--o", type=int, default=None, help="type-B instructions to accept (40; embedded 1)"
    )
    parser.add_argument("--preset", default="default", choices=("default", "paper"))
    parser.add_argument(
        "--embedded", action="store_true", help="the two embedded local models, not doubles"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="embedded: steps 2 and 4 concurrency"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        help="embedded: step-1 window of the pipeline run (the baseline keeps 1; "
        "another value changes which records come out)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="embedded: skip the sequential run"
    )
    parser.add_argument(
        "--disk",
        action="store_true",
        help="doubles: write a records file (fsynced, as generate does) instead of memory",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    io = args.io if args.io is not None else (2 if args.embedded else 60)
    o = args.o if args.o is not None else (1 if args.embedded else 40)
    targets = {"input_output": io, "output": o}
    if args.embedded:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        emb = {"pipeline": embedded_settings(args.preset, targets, args.concurrency, args.window)}
        if not args.no_baseline:
            emb["sequential"] = embedded_settings(args.preset, targets, 1)
        measured = asyncio.run(embedded_runs(emb))
        results: dict[str, dict[str, Any]] = {}
        for name, (summary, wall, tokens) in measured.items():
            kept = summary.records_written
            results[name] = {
                "records": kept,
                "wall_s": round(wall, 1),
                "examples_per_min": round(kept / wall * 60, 2),
                "tokens_per_s": round(tokens / wall, 1),
                "attempts": sum(summary.attempts.values()),
            }
        print(f"embedded local models (CPU), targets {targets}, preset {args.preset}")
        print(f"{'run':<12}{'records':>9}{'wall s':>9}{'ex/min':>9}{'tok/s':>8}{'tries':>7}")
        for name, r in results.items():
            print(
                f"{name:<12}{r['records']:>9}{r['wall_s']:>9.1f}{r['examples_per_min']:>9.2f}"
                f"{r['tokens_per_s']:>8.1f}{r['attempts']:>7}"
            )
        if "sequential" in results and results["sequential"]["examples_per_min"] > 0:
            ratio = (
                results["pipeline"]["examples_per_min"] / results["sequential"]["examples_per_min"]
            )
            print(f"speed-up: {ratio:.2f}x")
        elif "sequential" not in results:
            print("(single figure: no sequential baseline was run)")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
        return 0
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
    results = {}
    for name, settings in runs.items():
        summary, wall = asyncio.run(one_run(settings, args.latency, args.disk))
        kept = summary.records_written
        results[name] = {
            "records": kept,
            "wall_s": round(wall, 3),
            "examples_per_min": round(kept / wall * 60, 1),
            "attempts": sum(summary.attempts.values()),
        }
    sink = "records file (fsync)" if args.disk else "memory"
    print(
        f"latency {args.latency * 1000:.0f} ms/request, targets {targets}, "
        f"preset {args.preset}, sink {sink}"
    )
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
