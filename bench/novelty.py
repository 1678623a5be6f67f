"""Benchmark: does the novelty filter stay flat as the pool grows?

Offers ``--offers`` generated instructions (200,000 by default) to a
:class:`~ensemble_async.rouge.NoveltyFilter` (threshold 0.7) and prints, for every window of
``--window`` offers (20,000), the offers per second (wall clock, and per CPU second of this
single-threaded process, which other load on a shared machine disturbs less), the pool
size at the end of the window and the process's resident memory. The figure of merit is
the CPU-time rate of the last window against that of the first (target >= 0.5x).

The text is built to defeat a toy index: a 30,000-word vocabulary drawn from a Zipf
distribution (exponent 1.0; the 120 most frequent "words" are real English function words,
the rest pronounceable made-up words), instruction-like openings ("Write a short story
about", "Classify the following", ...), 4-16 content words each, and 15% near duplicates
of recent instructions (a word or two dropped, inserted or replaced), so both decisions
occur.

Baseline (``--baseline-offers``, 40,000 by default, 0 to skip): the previous engine, which
decides with the full inverted index and the weaker bound ``2 * overlap / (la + lb)``
(its per-offer cost grows with the pool), on the same sequence. Every decision of both
engines is asserted equal.

``--pool-size N`` instead fills a pool with N generated instructions through ``add`` and
reports the resident memory (the 1,000,000-instruction target is < 2 GB), then times
2,000 offers against that pool.

Run: ``python bench/novelty.py`` (``--offers 60000`` for a quicker run),
``python bench/novelty.py --pool-size 1000000``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ensemble_async.rouge import _BOUND_EPS, _SCALAR_BATCH, NoveltyFilter, _Query

THRESHOLD = 0.7
VOCAB_SIZE = 30_000
ZIPF_S = 1.0
NEAR_DUPLICATES = 0.15

_FUNCTION_TEXT = (
    "the of and to a in for is on that by this "
    "with you it not or be are from at as your all "
    "have new more an was we will can us about if my "
    "has but our one other do no they he up may what "
    "which their out use any there see only so his when here "
    "who also now help get view been would how were me some "
    "these its like than find back top had just over into two "
    "well last most make them should her such after where then first "
    "very through good could each those same both few many must own "
    "while under between because did does made few every why off still"
)
FUNCTION_WORDS = _FUNCTION_TEXT.split()

OPENINGS = [
    "Write a short story about",
    "Write a poem about",
    "Explain why",
    "Explain how",
    "Summarize the following article about",
    "Classify the following sentence about",
    "Give me a list of",
    "Generate three questions about",
    "Describe",
    "Suggest a name for",
    "Translate into French:",
    "Rewrite the paragraph about",
    "Compose an email to",
    "What is the difference between",
    "Create a recipe with",
    "Find the main idea of the text about",
    "Identify the errors in",
    "Compare",
    "Brainstorm ideas for",
    "Tell me a joke about",
    "Outline a plan to",
    "Design a quiz on",
    "Predict what happens if",
    "Sort the following items:",
    "Convert the sentence into the passive voice:",
    "Extract all names from",
    "Draft a tweet about",
    "Propose an experiment on",
    "Detect the sentiment of a review of",
    "Come up with a slogan for",
]

_ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p"]
_ONSETS += ["pr", "qu", "r", "s", "sh", "sl", "st", "t", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]


def make_vocabulary(size: int = VOCAB_SIZE, seed: int = 11) -> list[str]:
    """Function words first, then distinct made-up words, in rank order."""
    rng = random.Random(seed)
    words = list(dict.fromkeys(FUNCTION_WORDS))
    seen = set(words)
    while len(words) < size:
        syllables = rng.choice([1, 2, 2, 2, 3, 3, 4])
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class InstructionGenerator:
    """A deterministic stream of instruction-like texts with a Zipf vocabulary."""

    def __init__(self, seed: int = 42, vocab_size: int = VOCAB_SIZE) -> None:
        self.rng = random.Random(seed)
        self.vocab = make_vocabulary(vocab_size)
        weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(len(self.vocab))]
        self.cum = list(itertools.accumulate(weights))
        self.recent: list[str] = []

    def fresh(self) -> str:
        rng = self.rng
        k = rng.randint(4, 16)
        words = rng.choices(self.vocab, cum_weights=self.cum, k=k)
        return f"{rng.choice(OPENINGS)} {' '.join(words)}."

    def near_duplicate(self) -> str:
        rng = self.rng
        words = rng.choice(self.recent).rstrip(".").split()
        for _ in range(rng.randint(1, 2)):
            pos = rng.randrange(len(words))
            op = rng.random()
            if op < 0.35 and len(words) > 4:
                del words[pos]
            elif op < 0.7:
                words.insert(pos, rng.choices(self.vocab, cum_weights=self.cum)[0])
            else:
                words[pos] = rng.choices(self.vocab, cum_weights=self.cum)[0]
        return " ".join(words) + "."

    def __iter__(self) -> Iterator[str]:
        while True:
            if self.recent and self.rng.random() < NEAR_DUPLICATES:
                text = self.near_duplicate()
            else:
                text = self.fresh()
            self.recent.append(text)
            if len(self.recent) > 2000:
                del self.recent[:1000]
            yield text


def rss_mib() -> float:
    """Current resident set size of this process (Linux), in MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - not Linux


class PreviousEngine(NoveltyFilter):
    """The engine before prefix filtering: full inverted index, bound ``2o/(la+lb)``."""

    def is_novel(self, text: str) -> bool:
        query = self._query(text)
        if query.length == 0 or not self._texts:
            return True
        return self._max_pruned(query, stop_above=self.threshold) <= self.threshold

    def _max_pruned(self, query: _Query, stop_above: float) -> float:
        """Whether some entry scores above ``stop_above``, by bound-pruned scoring that
        stops at the first such score: the result is exact only in how it compares with
        ``stop_above``."""
        all_bounds = 2.0 * self._shared(query) / (query.length + self._lens_np)
        entries = np.flatnonzero((all_bounds >= stop_above - _BOUND_EPS) & (all_bounds > 0.0))
        bounds = all_bounds[entries]
        order = np.argsort(-bounds, kind="stable")
        entries, bounds = entries[order], bounds[order]
        n = len(entries)
        head = min(n, _SCALAR_BATCH)
        best = 0.0
        for k in range(head):
            if bounds[k] < max(best, stop_above) - _BOUND_EPS:
                return best
            best = max(best, self._score(query, int(entries[k])))
            if best > stop_above:
                return best
        if head == n:
            return best
        rest = entries[head:][bounds[head:] >= max(best, stop_above) - _BOUND_EPS]
        if len(rest) == 0:
            return best
        return max(best, float(self._score_many(query, rest).max()))


def run_windows(
    engine: NoveltyFilter, texts: Sequence[str], window: int, label: str
) -> tuple[list[bool], list[float]]:
    """Offer ``texts`` window by window; return the decisions and the CPU-time rates."""
    decisions: list[bool] = []
    rates: list[float] = []
    print(f"\n{label}")
    head = f"{'offers':>9} {'offers/s':>10} {'offers/cpu-s':>13} {'vs first':>9}"
    print(f"{head} {'pool':>9} {'RSS MiB':>9}")
    for start in range(0, len(texts), window):
        chunk = texts[start : start + window]
        t0, c0 = time.perf_counter(), time.process_time()
        decisions += [engine.offer(t) for t in chunk]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rates.append(len(chunk) / cpu)
        end = start + len(chunk)
        print(
            f"{end:>9,} {len(chunk) / wall:>10,.0f} {rates[-1]:>13,.0f} "
            f"{rates[-1] / rates[0]:>8.2f}x {len(engine):>9,} {rss_mib():>9,.0f}",
            flush=True,
        )
    return decisions, rates


def pool_memory(size: int, seed: int) -> int:
    base = rss_mib()
    gen = iter(InstructionGenerator(seed))
    novelty = NoveltyFilter(threshold=THRESHOLD)
    t0 = time.perf_counter()
    for text in itertools.islice(gen, size):
        novelty.add(text)
    build = time.perf_counter() - t0
    rss = rss_mib()
    print(f"pool of {len(novelty):,} instructions built with add() in {build:.1f} s")
    print(f"RSS {rss:,.0f} MiB (interpreter and libraries before: {base:,.0f} MiB)")
    probe = list(itertools.islice(gen, 2000))
    t0, c0 = time.perf_counter(), time.process_time()
    accepted = sum(novelty.offer(t) for t in probe)
    rate = len(probe) / (time.perf_counter() - t0)
    cpu_rate = len(probe) / (time.process_time() - c0)
    print(
        f"then {len(probe):,} offers at {rate:,.0f} offers/s, {cpu_rate:,.0f} offers/cpu-s "
        f"({accepted} accepted)"
    )
    print(f"target RSS < 2048 MiB: {'met' if rss < 2048 else 'NOT met'}")
    return 0 if rss < 2048 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--offers", type=int, default=200_000, help="offers (200000)")
    parser.add_argument("--window", type=int, default=20_000, help="window size (20000)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (42)")
    parser.add_argument(
        "--baseline-offers",
        type=int,
        default=40_000,
        help="offers for the previous engine (40000; 0 skips it)",
    )
    parser.add_argument("--pool-size", type=int, default=0, help="memory check instead")
    args = parser.parse_args(argv)
    if args.pool_size:
        return pool_memory(args.pool_size, args.seed)

    texts = list(itertools.islice(InstructionGenerator(args.seed), args.offers))
    print(
        f"{len(texts):,} offers, threshold {THRESHOLD}, Zipf vocabulary of {VOCAB_SIZE:,} "
        f"words, {NEAR_DUPLICATES:.0%} near duplicates"
    )
    decisions, rates = run_windows(
        NoveltyFilter(threshold=THRESHOLD), texts, args.window, "NoveltyFilter (prefix filter)"
    )
    accepted = sum(decisions)
    print(f"accepted {accepted:,}, rejected {len(decisions) - accepted:,}")
    ratio = rates[-1] / rates[0]
    verdict = "met" if ratio >= 0.5 else "NOT met"
    print(f"last window / first window: {ratio:.2f}x (target >= 0.5x: {verdict})")
    if args.baseline_offers:
        n = min(args.baseline_offers, len(texts))
        base, base_rates = run_windows(
            PreviousEngine(threshold=THRESHOLD),
            texts[:n],
            args.window,
            "previous engine (full index, 2o/(la+lb) bound)",
        )
        assert base == decisions[:n], "the engines disagree on a decision"
        k = len(base_rates) - 1
        print(
            f"identical decisions over {n:,} offers; window {k + 1}: "
            f"prefix filter {rates[k]:,.0f}/cpu-s vs previous {base_rates[k]:,.0f}/cpu-s "
            f"({rates[k] / base_rates[k]:.1f}x)"
        )
    return 0 if ratio >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
