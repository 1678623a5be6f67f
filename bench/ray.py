"""What Ray costs: an ensemble's items/s with its members' requests made from Ray actors
(one and two local nodes) against the same members in one process.

Three HTTP doubles (two TGI, one vLLM-style) run in subprocesses with ``--latency``
service time.  Each run sends ``--items`` items through ``Ensemble.map``:

* ``single-process``: plain members, every request from this process (the baseline);
* ``ray, 1 node`` / ``ray, 2 nodes``: each member's backend hosted by ``--replicas``
  Ray actors (kind ``ray`` with ``hosted_kind`` tgi/openai) on a local cluster started
  with ``ray.cluster_utils.Cluster``.

It prints items/s, the ratio to the baseline, and the per-item overhead Ray adds
(wall-clock difference per item at the same concurrency).  On a 2-core machine no gain
is expected: the point is that the overhead is small.

    python bench/ray.py                    # 600 items, 20 ms service time
    python bench/ray.py --items 2000 --latency 0.05
    python bench/ray.py --unbatched        # also one actor call per request (no coalescing)

``--pipeline`` measures the whole Ensemble-Instruct run instead: ``generate`` against
Ensemble-Instruct-like doubles (a TGI writer, a vLLM-style answerer), in one process and
with ``--ray`` on 1- and 2-node clusters; examples kept per second.

    python bench/ray.py --pipeline --io 60 --o 40

This file is named after the package it measures; run as a script, its own folder comes
first on ``sys.path`` and would shadow Ray, so it takes that folder off before anything
imports Ray (``.ci/typecheck`` checks it under another name for the same reason).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.types import GenerationRequest

# Ray is imported inside functions only, after this: this folder off sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def start_double(kind: str, latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ensemble_async.testing.serve", kind, "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        raise SystemExit(f"double did not start: {line!r}")
    return proc, line.split()[1]


async def run(members: list[Member], items: int) -> float:
    requests = [GenerationRequest(prompt=f"item {i}", max_new_tokens=8) for i in range(items)]
    async with Ensemble(members, max_items_in_flight=128) as ensemble:
        # Warm up (actors start, pools connect) before the clock starts.
        async for _ in ensemble.map(requests[:16]):
            pass
        started = time.perf_counter()
        done = 0
        async for result in ensemble.map(requests):
            done += 1 if result.candidates else 0
        wall = time.perf_counter() - started
    assert done == items
    return wall


def local_members(urls: list[tuple[str, str]]) -> list[Member]:
    made: list[Member] = []
    for i, (kind, url) in enumerate(urls):
        backend: Any = (
            TGIBackend(url, name=f"m{i}") if kind == "tgi" else OpenAIBackend(url, name=f"m{i}")
        )
        made.append(Member(backend, concurrency=64, retry=RetryPolicy.never()))
    return made


def ray_members(urls: list[tuple[str, str]], replicas: int, max_batch: int) -> list[Member]:
    from ensemble_async.ray import RayBackend

    return [
        Member(
            RayBackend(
                hosted_kind=kind,
                url=url,
                replicas=replicas,
                num_cpus=0.1,
                max_batch=max_batch,
                name=f"m{i}",
            ),
            concurrency=64,
            retry=RetryPolicy.never(),
        )
        for i, (kind, url) in enumerate(urls)
    ]


def with_cluster(nodes: int, body: Callable[[], float]) -> float:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        return body()
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]


def pipeline_rows(
    latency: float, io: int, o: int, window: int = 8, stages: int = 16
) -> list[tuple[str, float, float, int]]:
    """(run, wall seconds, the run's own seconds, records) for generate in one process and
    on 1 and 2 nodes; the run's own time leaves out starting the actors and probing.
    ``window``/``stages``: the pipeline's step-1 window and steps 2-4 concurrency (the
    same for every run; the window is part of the output's identity)."""
    import shutil
    import tempfile
    from pathlib import Path

    from ensemble_async import cli

    procs = []
    urls = []
    for kind, name in (("tgi", "writer-lm"), ("openai", "answer-lm")):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ensemble_async.testing.serve",
                kind,
                "--ei",
                name,
                "--latency",
                str(latency),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        procs.append(proc)
        urls.append(proc.stdout.readline().split()[1])
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))

    def config(name: str) -> Path:
        out = work / name / "records.jsonl"
        cfg = work / f"{name}.toml"
        cfg.write_text(
            f"""
[run]
seed = 1
output = "{out}"
cache = false
targets = {{ input_output = {io}, output = {o} }}

[backends.writer]
kind = "tgi"
url = "{urls[0]}"
concurrency = {max(32, 2 * stages)}

[backends.answerer]
kind = "openai"
url = "{urls[1]}"
concurrency = {max(32, 2 * stages)}

[roles]
writer = "writer"
answerers = ["answerer"]

[overrides]
instruction_window = {window}
instance_concurrency = {stages}
answer_concurrency = {stages}
queue_size = {2 * stages}
"""
        )
        return cfg

    def generate(name: str, *extra: str) -> tuple[str, float, float, int]:
        cfg = config(name)
        started = time.perf_counter()
        code = cli.main(["generate", "--config", str(cfg), "--quiet", *extra])
        wall = time.perf_counter() - started
        assert code == 0, f"{name}: exit {code}"
        kept = len((work / name / "records.jsonl").read_text().splitlines())
        summary = json.loads((work / name / "records.summary.json").read_text())
        return name, wall, float(summary["wall_s"]), kept

    try:
        # Each setting runs twice: the first on a fresh cluster (Ray still starting its
        # idle worker processes, which take CPU), the second on the same, now warm, one.
        generate("warm-up")
        rows = [generate("single-process")]
        for nodes in (1, 2):
            label = f"ray, {nodes} node{'s' if nodes > 1 else ''}"

            def body(label: str = label) -> float:
                import ray as ray_module

                address = ray_module.get_runtime_context().gcs_address
                stem = label.replace(" ", "").replace(",", "-")
                for when in ("cold", "warm"):
                    row = generate(f"{stem}-{when}", "--ray", address)
                    rows.append((f"{label}, {when}", *row[1:]))
                return row[1]

            with_cluster(nodes, body)
        return rows
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", action="store_true", help="measure generate instead")
    parser.add_argument("--io", type=int, default=60, help="--pipeline: input-output target")
    parser.add_argument("--o", type=int, default=40, help="--pipeline: output-only target")
    parser.add_argument(
        "--window", type=int, default=8, help="--pipeline: step-1 attempts in flight per kind"
    )
    parser.add_argument(
        "--stages", type=int, default=16, help="--pipeline: steps 2-4 in flight (16)"
    )
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--replicas", type=int, default=2, help="actors per member")
    parser.add_argument(
        "--unbatched",
        action="store_true",
        help="also run Ray with one actor call per request (max_batch=1): the cost coalescing saves",
    )
    args = parser.parse_args()
    if args.pipeline:
        rows3 = pipeline_rows(args.latency, args.io, args.o, args.window, args.stages)
        _, base_wall, base_run, _ = rows3[0]
        print(
            f"generate, {args.io} + {args.o} instructions, service time {args.latency * 1000:.0f} ms"
        )
        print("wall: the whole command; run: the pipeline alone (actors started, probes done)")
        print(
            f"{'run':<22} {'kept':>5} {'wall s':>7} {'vs single':>10} {'run s':>7} "
            f"{'kept/s':>8} {'vs single':>10} {'overhead/record':>16}"
        )
        for name, wall, run_s, kept in rows3:
            overhead_ms = (run_s - base_run) / kept * 1000
            print(
                f"{name:<22} {kept:5d} {wall:7.2f} {base_wall / wall:9.2f}x {run_s:7.2f} "
                f"{kept / run_s:8.1f} {base_run / run_s:9.2f}x {overhead_ms:13.2f} ms"
            )
        return

    procs: list[subprocess.Popen[str]] = []
    urls: list[tuple[str, str]] = []
    for kind in ("tgi", "tgi", "openai"):
        proc, url = start_double(kind, args.latency)
        procs.append(proc)
        urls.append((kind, url))
    try:
        rows: list[tuple[str, float]] = []
        base = asyncio.run(run(local_members(urls), args.items))
        rows.append(("single-process", base))
        for nodes in (1, 2):
            label = f"ray, {nodes} node{'s' if nodes > 1 else ''}"
            batchings = [("", 64), (", unbatched", 1)] if args.unbatched else [("", 64)]

            def body(label: str = label, batchings: list[tuple[str, int]] = batchings) -> float:
                for suffix, max_batch in batchings:
                    members = ray_members(urls, args.replicas, max_batch)
                    rows.append((label + suffix, asyncio.run(run(members, args.items))))
                return rows[-1][1]

            with_cluster(nodes, body)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)

    print(f"{args.items} items x 3 members, service time {args.latency * 1000:.0f} ms")
    print(f"{'run':<27} {'items/s':>9} {'vs single':>10} {'overhead/item':>14}")
    for name, wall in rows:
        rate = args.items / wall
        overhead_ms = (wall - base) / args.items * 1000
        print(f"{name:<27} {rate:9.1f} {base / wall:9.2f}x {overhead_ms:12.2f} ms")


if __name__ == "__main__":
    main()
