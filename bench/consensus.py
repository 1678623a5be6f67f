"""Consensus policies side by side: wait-all (the baseline) vs exact vs quorum.

Three simulated members with lognormal latency, the last one 3x slower, 2,000 items:
wall time and p50/p95 item latency per policy, in one run.  Plus: how often quorum keeps
what wait-all keeps on the 153 reference consensus cases (when ../shared is present).
Target: quorum cuts p95 item latency by at least 40% against wait-all.

    python bench/consensus.py [--items 2000] [--median-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from _sim import SimBackend

from ensemble_async.consensus import IncrementalSelector, select
from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VARIANTS = ["{t}", "{t}.", "The answer: {t}", "{t}, probably", "not sure about {t}"]


def synthetic(p_right: float) -> Any:
    """Right answer with probability ``p_right`` (sometimes in another case/punctuation)."""

    def make(prompt: str, rng: random.Random) -> str:
        truth = f"answer {prompt}"
        if rng.random() < p_right:
            return truth if rng.random() < 0.8 else truth.upper() + "!"
        return rng.choice(VARIANTS).format(t=f"guess {rng.randint(0, 9)}")

    return make


def from_cases(cases: list[list[str]], member: int) -> Any:
    """Member ``member`` answers item i with candidate ``member`` of reference case i % 153."""
    return lambda prompt, _rng: cases[int(prompt) % len(cases)][member]


def lognormal(median_s: float, sigma: float = 0.5) -> Any:
    return lambda rng: rng.lognormvariate(math.log(median_s), sigma)


async def run_policy(
    policy: str, answers: list[Any], items: int, median_s: float, seed: int, in_flight: int
) -> dict[str, Any]:
    latency = [lognormal(median_s), lognormal(median_s), lognormal(3 * median_s)]
    names = ["fast-a", "fast-b", "slow-c"]
    backends = [
        SimBackend(n, a, lat, seed=seed + k)
        for k, (n, a, lat) in enumerate(zip(names, answers, latency, strict=True))
    ]
    members = [Member(b, concurrency=10_000, retry=RetryPolicy.never()) for b in backends]
    # min_candidates=1: early decisions on any arrivals, as these figures were measured
    # (the default, every candidate, would turn exact and quorum into wait-all).
    kwargs: dict[str, Any] = {"max_items_in_flight": in_flight, "min_candidates": 1}
    if policy == "wait-all":
        kwargs |= {"policy": "deadline", "deadline_s": 3600.0}
    elif policy.startswith("quorum+deadline"):
        kwargs |= {"policy": "quorum", "agreement": 0.5, "deadline_s": 3 * median_s}
    elif policy == "quorum":
        kwargs |= {"policy": "quorum", "agreement": 0.5}
    else:
        kwargs |= {"policy": policy}
    latencies: list[float] = []
    kept = 0
    decisions: dict[int, int | None] = {}
    started = time.perf_counter()
    async with Ensemble(members, **kwargs) as ens:
        async for result in ens.map(str(i) for i in range(items)):
            latencies.append(result.wall_s)
            kept += result.kept
            decisions[result.index] = result.decision.index
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {
        "policy": policy,
        "wall": wall,
        "p50": q[49],
        "p95": q[94],
        "kept": kept,
        "decisions": decisions,
    }


def load_cases() -> list[list[str]] | None:
    path = SHARED / "reference" / "ensemble-instruct" / "consensus_cases.jsonl"
    if not path.exists():
        return None
    return [
        json.loads(line)["candidates"] for line in path.read_text().splitlines() if line.strip()
    ]


def quorum_agreement(cases: list[list[str]] | None) -> str:
    if cases is None:
        return "reference cases not present (../shared absent): skipped"
    same = total = 0
    for cands in cases:
        expected = select(cands).index
        for order in itertools.permutations(range(len(cands))):
            sel = IncrementalSelector(len(cands), policy="quorum", agreement=0.5)
            decision = None
            for i in order:
                decision = sel.add(i, cands[i])
                if decision is not None:
                    break
            got = (decision or sel.finalize()).index
            same += got == expected
            total += 1
    return (
        f"quorum (agreement 0.5) picks what wait-all picks in {same}/{total} = "
        f"{same / total:.1%} (153 reference cases x every arrival order)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--median-ms", type=float, default=50.0)
    parser.add_argument("--in-flight", type=int, default=32, help="items in flight at once")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    median_s = args.median_ms / 1000
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.items} items, 3 members, lognormal latency "
        f"median {args.median_ms:.0f} ms (sigma 0.5), member 3 is 3x slower"
    )
    cases = load_cases()
    scenarios: list[tuple[str, list[Any]]] = [
        ("synthetic, fast members agree ~90%", [synthetic(0.95), synthetic(0.95), synthetic(0.9)]),
        ("synthetic, fast members agree ~50%", [synthetic(0.72), synthetic(0.72), synthetic(0.7)]),
    ]
    if cases is not None:
        scenarios.append(
            ("153 reference cases (real outputs)", [from_cases(cases, k) for k in range(3)])
        )
    policies = ("wait-all", "exact", "quorum", "quorum+deadline")
    for title, answers in scenarios:
        rows = [
            await run_policy(p, answers, args.items, median_s, args.seed, args.in_flight)
            for p in policies
        ]
        base = rows[0]
        print(f"\n## {title}")
        print(
            f"{'policy':<16} {'wall s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p95 vs wait-all':>16} "
            f"{'kept':>6} {'same pick as wait-all':>22}"
        )
        for r in rows:
            same = sum(r["decisions"][i] == base["decisions"][i] for i in base["decisions"])
            print(
                f"{r['policy']:<16} {r['wall']:>7.2f} {r['p50'] * 1000:>8.1f} "
                f"{r['p95'] * 1000:>8.1f} {r['p95'] / base['p95']:>15.2f}x {r['kept']:>6} "
                f"{same / len(base['decisions']):>21.1%}"
            )
    print()
    print("quorum: agreement bar ROUGE-L 0.5; quorum+deadline: the same, decided with what has")
    print("arrived after 3x the fast members' median latency.  Target: quorum p95 cut >= 40%.")
    print(quorum_agreement(cases))


if __name__ == "__main__":
    asyncio.run(main())
