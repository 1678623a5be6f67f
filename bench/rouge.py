"""Benchmark: the novelty filter against rouge_score, pair by pair.

Offers ``--n`` candidate instructions (5,000 by default) to a pool that starts with 175
seed instructions and grows with every accepted candidate, the Self-Instruct way: a
candidate is rejected when its ROUGE-L against any pool entry is > 0.7. Three engines run
the same sequence and must agree on every accept/reject decision:

* ``rouge_score``: ``RougeScorer(["rougeL"]).score(candidate, entry)`` for every pool entry
  (what Self-Instruct and the Ensemble-Instruct reference do; both texts re-tokenized for
  every pair);
* ``pretokenized``: rouge_score's own tokenizer once per text and its ``_score_lcs`` per
  pair (how Stanford Alpaca sped it up);
* ``NoveltyFilter``: this project's engine (token ids, inverted index, bound pruning,
  bit-parallel LCS).

Seeds: the 175 Self-Instruct seed instructions when ``../shared/reference`` is present
(read, never copied), otherwise 175 generated ones. Candidates are generated
deterministically from the word lists below (the project's own), with a share of near
duplicates of earlier candidates so that both decisions occur.

Run: ``python bench/rouge.py`` (``--n 1000`` for a quicker run; ``--skip-rouge-score`` to
time only the faster engines).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rouge_score import rouge_scorer

from ensemble_async.rouge import NoveltyFilter

THRESHOLD = 0.7
SEED_FILE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "reference"
    / "self-instruct"
    / "seed_tasks.jsonl"
)

OPENERS = [
    "Write",
    "Explain",
    "Summarize",
    "Describe",
    "Generate",
    "Suggest",
    "Create",
    "Rewrite",
    "Compose",
    "Outline",
    "Draft",
    "List",
    "Give me",
    "Tell me",
    "Come up with",
    "Brainstorm",
    "Propose",
    "Design",
]
QUESTIONS = [
    "Classify",
    "Identify",
    "Find",
    "Determine",
    "Detect",
    "Decide whether",
    "Check if",
    "Predict",
    "Estimate",
    "Rank",
    "Sort",
    "Extract",
    "Translate",
    "Convert",
    "Correct",
    "Compare",
]
ARTIFACTS = [
    "a short story",
    "a poem",
    "a haiku",
    "an email",
    "a tweet",
    "a product description",
    "a recipe",
    "a cover letter",
    "a news headline",
    "a slogan",
    "a dialogue",
    "a riddle",
    "a joke",
    "a speech",
    "a review",
    "a summary",
    "a lesson plan",
    "a job posting",
    "a travel itinerary",
    "a workout plan",
    "three tips",
    "five questions",
    "a list of ideas",
    "a step-by-step guide",
    "an analogy",
    "a definition",
    "a comparison table",
    "a thank-you note",
    "an apology",
    "a limerick",
]
TOPICS = [
    "climate change",
    "a rainy afternoon",
    "learning to cook",
    "the history of bicycles",
    "renewable energy",
    "a first day at school",
    "saving money",
    "remote work",
    "the ocean",
    "a lost dog",
    "healthy breakfasts",
    "time management",
    "ancient Rome",
    "space exploration",
    "a small bakery",
    "public transport",
    "friendship",
    "gardening in winter",
    "electric cars",
    "the water cycle",
    "a job interview",
    "online privacy",
    "a birthday party",
    "mountain hiking",
    "chess openings",
    "a noisy neighbour",
    "volcanoes",
    "a city library",
    "the immune system",
    "coffee",
    "jazz music",
    "recycling",
    "a broken phone",
    "honeybees",
    "machine learning",
    "a football match",
]
AUDIENCES = [
    "for a child",
    "for a beginner",
    "for an expert",
    "for a busy parent",
    "for a teenager",
    "for a retired teacher",
    "for your manager",
    "for a customer",
    "",
    "",
]
CONSTRAINTS = [
    "in one sentence",
    "in three sentences",
    "in under fifty words",
    "using simple words",
    "without using the letter e",
    "in a formal tone",
    "in a funny way",
    "as a numbered list",
    "with a surprising ending",
    "from the point of view of a cat",
    "that rhymes",
    "and explain your reasoning",
    "",
    "",
    "",
]
SUBJECTS = [
    "the sentence",
    "the review",
    "the tweet",
    "the email",
    "the news article",
    "the paragraph",
    "the product title",
    "the customer message",
    "the list of numbers",
    "the word",
    "the question",
    "the recipe",
    "the code snippet",
    "the movie plot",
    "the song lyrics",
]
JUDGEMENTS = [
    "as positive, negative or neutral",
    "as spam or not spam",
    "by topic",
    "as formal or informal",
    "as fact or opinion",
    "as true or false",
    "by the emotion it expresses",
    "as sarcastic or sincere",
    "into English",
    "into French",
    "into plain language",
    "into the past tense",
    "in alphabetical order",
    "by importance",
    "by difficulty",
    "",
]
FILLERS = [
    "given below",
    "that follows",
    "provided",
    "from the input",
    "",
    "",
]


def _clean(words: Sequence[str]) -> str:
    return " ".join(w for w in words if w) + "."


def generate_instruction(rng: random.Random) -> str:
    """One plausible instruction built from the word lists above."""
    if rng.random() < 0.55:
        return _clean(
            [
                rng.choice(OPENERS),
                rng.choice(ARTIFACTS),
                "about",
                rng.choice(TOPICS),
                rng.choice(AUDIENCES),
                rng.choice(CONSTRAINTS),
            ]
        )
    return _clean(
        [
            rng.choice(QUESTIONS),
            rng.choice(SUBJECTS),
            rng.choice(FILLERS),
            rng.choice(JUDGEMENTS),
            rng.choice(CONSTRAINTS),
        ]
    )


def _perturb(text: str, rng: random.Random) -> str:
    """A near duplicate: drop, repeat or replace a word or two."""
    words = text.rstrip(".").split()
    for _ in range(rng.randint(1, 2)):
        op = rng.random()
        pos = rng.randrange(len(words))
        if op < 0.35 and len(words) > 4:
            del words[pos]
        elif op < 0.7:
            words.insert(pos, rng.choice(["please", "briefly", "also", "the", "new", "now"]))
        else:
            words[pos] = rng.choice(TOPICS).split()[-1]
    return " ".join(words) + "."


def generate_candidates(n: int, seed: int = 42) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.3:
            out.append(_perturb(rng.choice(out[-200:]), rng))
        else:
            out.append(generate_instruction(rng))
    return out


def load_seeds() -> tuple[list[str], str]:
    if SEED_FILE.is_file():
        with SEED_FILE.open(encoding="utf-8") as fh:
            seeds = [json.loads(line)["instruction"] for line in fh if line.strip()]
        return seeds, f"{len(seeds)} Self-Instruct seed instructions (read from ../shared)"
    rng = random.Random(7)
    return [generate_instruction(rng) for _ in range(175)], "175 generated seed instructions"


def run_rouge_score(seeds: list[str], candidates: list[str]) -> list[bool]:
    """The Self-Instruct way: score the candidate against every pool entry."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(seeds)
    decisions: list[bool] = []
    for cand in candidates:
        best = max((scorer.score(cand, entry)["rougeL"].fmeasure for entry in pool), default=0.0)
        ok = best <= THRESHOLD
        decisions.append(ok)
        if ok:
            pool.append(cand)
    return decisions


def run_pretokenized(seeds: list[str], candidates: list[str]) -> list[bool]:
    """rouge_score's tokenizer once per text and its LCS scorer per pair (Alpaca's way)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tok: Callable[[str], list[str]] = scorer._tokenizer.tokenize
    score_lcs = rouge_scorer._score_lcs
    pool = [tok(s) for s in seeds]
    decisions: list[bool] = []
    for cand in candidates:
        tokens = tok(cand)
        best = max((score_lcs(tokens, entry).fmeasure for entry in pool), default=0.0)
        ok = best <= THRESHOLD
        decisions.append(ok)
        if ok:
            pool.append(tokens)
    return decisions


def run_filter(seeds: list[str], candidates: list[str], *, prune: bool = True) -> list[bool]:
    novelty = NoveltyFilter(seeds, threshold=THRESHOLD, prune=prune)
    return [novelty.offer(cand) for cand in candidates]


def _timed(fn: Callable[[], list[bool]]) -> tuple[list[bool], float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=5000, help="number of candidates (5000)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (42)")
    parser.add_argument(
        "--skip-rouge-score",
        action="store_true",
        help="skip the slow per-pair rouge_score baseline",
    )
    args = parser.parse_args(argv)

    seeds, seed_note = load_seeds()
    candidates = generate_candidates(args.n, args.seed)
    print(f"pool starts with {seed_note}; {len(candidates)} candidates; threshold {THRESHOLD}")

    fast, t_fast = _timed(lambda: run_filter(seeds, candidates))
    accepted = sum(fast)
    pairs = sum(len(seeds) + sum(fast[:i]) for i in range(len(fast)))
    print(f"accepted {accepted}, rejected {len(fast) - accepted}; {pairs:,} candidate-pool pairs")
    print(f"{'engine':<28} {'seconds':>10} {'us/pair':>9} {'NoveltyFilter speedup':>22}")

    def row(name: str, secs: float) -> None:
        line = f"{name:<28} {secs:>10.3f} {secs / pairs * 1e6:>9.3f} {secs / t_fast:>21.1f}x"
        print(line, flush=True)

    row("NoveltyFilter", t_fast)
    brute, t_brute = _timed(lambda: run_filter(seeds, candidates, prune=False))
    assert brute == fast, "pruning changed a decision"
    row("NoveltyFilter(prune=False)", t_brute)
    pre, t_pre = _timed(lambda: run_pretokenized(seeds, candidates))
    assert pre == fast, "pretokenized rouge_score disagrees with NoveltyFilter"
    row("rouge_score pretokenized", t_pre)
    if not args.skip_rouge_score:
        ref, t_ref = _timed(lambda: run_rouge_score(seeds, candidates))
        assert ref == fast, "rouge_score disagrees with NoveltyFilter"
        row("rouge_score per pair", t_ref)
    print("identical accept/reject sequence from every engine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
