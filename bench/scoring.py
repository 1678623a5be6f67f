"""Local scoring throughput: batched forward passes vs one completion at a time.

Scores the same workload -- ``--requests`` concurrent score requests, each a prompt with
``--candidates`` completions of mixed length -- with the transformers adapter on
SmolLM2-135M-Instruct twice: micro-batched (``max_batch_size=--batch``: concurrent
requests share right-padded forward passes) and one at a time (``max_batch_size=1``, one
forward pass per completion: the baseline).  Prints scored completion tokens/s of each
and the side-by-side ratio.  The model loads before the clock starts.

    python bench/scoring.py
    python bench/scoring.py --requests 16 --candidates 4 --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time

from ensemble_async.scoring import ScoreRequest

PROMPTS = [
    "Write one sentence about rivers.",
    "Explain why the sky looks blue.",
    "Give advice to someone learning to cook.",
    "Describe a quiet morning in a small town.",
    "List some uses of a paper clip.",
    "Explain how a bicycle stays upright.",
    "Summarise the plot of a detective story.",
    "Describe the sound of rain on a roof.",
]
ANSWERS = [
    " Rivers carry water from the hills to the sea.",
    " Sunlight scatters off air molecules, and blue light scatters the most, so the sky"
    " looks blue from every direction.",
    " Start with simple dishes, taste as you go, and keep your knives sharp.",
    " The bakery opens its shutters while the streets are still empty and the air smells"
    " of bread, and a cat watches from a window above the square.",
    " Hold papers together.",
    " A moving bicycle steers itself back under the rider: the front wheel turns into a"
    " lean, and the rider balances with small movements of the handlebars.",
]


def workload(requests: int, candidates: int) -> list[ScoreRequest]:
    """``requests`` score requests, each with ``candidates`` completions of mixed length."""
    out = []
    for i in range(requests):
        completions = tuple(ANSWERS[(i + k) % len(ANSWERS)] for k in range(candidates))
        out.append(ScoreRequest(prompt=PROMPTS[i % len(PROMPTS)], completions=completions))
    return out


async def measure(batch: int, requests: list[ScoreRequest], rounds: int, threads: int) -> float:
    """Median scored tokens/s over ``rounds`` rounds of all requests sent concurrently."""
    from ensemble_async.backends.transformers import TransformersBackend
    from ensemble_async.models import embedded_backend_options

    options = embedded_backend_options("smollm2-135m-instruct")
    rates: list[float] = []
    async with TransformersBackend(**options, max_batch_size=batch, threads=threads) as b:
        await b.score(ScoreRequest(prompt="Hello", completions=(" world",)))  # warm-up
        for _ in range(rounds):
            started = time.perf_counter()
            results = await asyncio.gather(*(b.score(r) for r in requests))
            wall = time.perf_counter() - started
            tokens = sum(s.num_tokens for scores in results for s in scores)
            rates.append(tokens / wall)
    return statistics.median(rates)


async def run(args: argparse.Namespace) -> None:
    requests = workload(args.requests, args.candidates)
    rows = args.requests * args.candidates
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} CPUs  "
        f"python {sys.version.split()[0]}"
    )
    print(
        f"== local scorer, SmolLM2-135M-Instruct, {args.requests} concurrent requests x "
        f"{args.candidates} completions ({rows} rows), threads={args.threads}"
    )
    base = await measure(1, requests, args.rounds, args.threads)
    print(
        f"{'one at a time (max_batch_size=1)':<38} {base:>9.1f} tokens/s (median of {args.rounds})"
    )
    batched = await measure(args.batch, requests, args.rounds, args.threads)
    label = f"batched (max_batch_size={args.batch})"
    print(f"{label:<38} {batched:>9.1f} tokens/s (median of {args.rounds})")
    print(f"{'ratio batched / one at a time':<38} {batched / base:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
