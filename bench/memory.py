"""Memory of the scheduler at scale: 1,000,000 items through ``Ensemble.map`` against
in-process zero-latency members; RSS at checkpoints and peak.

Baseline: the RSS at 100k items.  Target: peak under 500 MB and not growing with N
(RSS at 1M within a few MB of RSS at 100k).

    python bench/memory.py [--items 1000000] [--members 2]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Iterator

from _sim import SimBackend

from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts(n: int) -> Iterator[str]:
    for i in range(n):
        yield f"item {i}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    checkpoints = sorted(
        {10_000, 100_000, 250_000, 500_000, args.items} & set(range(args.items + 1))
    )
    members = [
        Member(SimBackend(f"m{k}", lambda p, _rng: f"answer to {p}"), concurrency=1024)
        for k in range(args.members)
    ]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.items:,} items, {args.members} zero-latency "
        f"members, {args.in_flight} items in flight; RSS before start {rss_mb():.1f} MB"
    )
    print(f"{'items':>10} {'RSS MB':>8} {'peak MB':>8} {'items/s':>9}")
    done = 0
    kept = 0
    at: dict[int, float] = {}
    started = time.perf_counter()
    async with Ensemble(members, max_items_in_flight=args.in_flight) as ens:
        async for result in ens.map(prompts(args.items)):
            done += 1
            kept += result.kept
            if done in checkpoints:
                at[done] = rss_mb()
                rate = done / (time.perf_counter() - started)
                print(f"{done:>10,} {at[done]:>8.1f} {peak_mb():>8.1f} {rate:>9.0f}")
        stats = ens.stats()
    assert done == args.items and kept == args.items, (done, kept)
    assert all(s["done"] == args.items for s in stats.values())
    if 100_000 in at:
        growth = at[args.items] - at[100_000]
        print(
            f"RSS at {args.items:,} vs 100,000: {growth:+.1f} MB "
            f"({at[args.items] / at[100_000]:.3f}x); peak {peak_mb():.1f} MB (target < 500 MB)"
        )


if __name__ == "__main__":
    asyncio.run(main())
