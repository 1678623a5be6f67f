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

    python bench/ray_cluster.py                    # 600 items, 20 ms service time
    python bench/ray_cluster.py --items 2000 --latency 0.05
"""

from __future__ import annotations

import argparse
import asyncio
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


def ray_members(urls: list[tuple[str, str]], replicas: int) -> list[Member]:
    from ensemble_async.ray import RayBackend

    return [
        Member(
            RayBackend(hosted_kind=kind, url=url, replicas=replicas, num_cpus=0.1, name=f"m{i}"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--replicas", type=int, default=2, help="actors per member")
    args = parser.parse_args()

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
            wall = with_cluster(
                nodes, lambda: asyncio.run(run(ray_members(urls, args.replicas), args.items))
            )
            rows.append((f"ray, {nodes} node{'s' if nodes > 1 else ''}", wall))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)

    print(f"{args.items} items x 3 members, service time {args.latency * 1000:.0f} ms")
    print(f"{'run':<16} {'items/s':>9} {'vs single':>10} {'overhead/item':>14}")
    for name, wall in rows:
        rate = args.items / wall
        overhead_ms = (wall - base) / args.items * 1000
        print(f"{name:<16} {rate:9.1f} {base / wall:9.2f}x {overhead_ms:12.2f} ms")


if __name__ == "__main__":
    main()
