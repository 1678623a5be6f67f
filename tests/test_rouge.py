"""ensemble_async.rouge: exact equality with rouge_score, and the novelty filter."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import rouge_scorer

from ensemble_async import rouge as rouge_module
from ensemble_async.consensus import normalize
from ensemble_async.rouge import (
    NoveltyFilter,
    _fmeasure_array,
    fmeasure,
    lcs_length,
    rouge_l,
    tokenize,
)

SCORERS = {stem: rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem) for stem in (False, True)}


def reference(a: str, b: str, *, stem: bool = False) -> float:
    score: float = SCORERS[stem].score(a, b)["rougeL"].fmeasure
    return score


def brute_max(text: str, pool: list[str], *, stem: bool = False) -> float:
    return max((reference(text, p, stem=stem) for p in pool), default=0.0)


def tokens_of(text: str) -> list[str]:
    """rouge_score's own tokenizer (no stemming)."""
    tokens: list[str] = SCORERS[False]._tokenizer.tokenize(text)
    return tokens


def brute_max_tokens(tokens: list[str], pool: list[list[str]]) -> float:
    """rouge_score's own LCS scorer over pre-tokenized texts (candidate = target)."""
    return max((rouge_scorer._score_lcs(tokens, p).fmeasure for p in pool), default=0.0)


# -- random strings ----------------------------------------------------------------------

WORDS = [
    "the", "a", "and", "of", "cat", "cats", "running", "runs", "ran", "generously",
    "generous", "caresses", "ponies", "flies", "dying", "agreed", "national", "write",
    "writes", "writing", "list", "lists", "sentence", "sentences", "x", "42", "3rd",
    "Über", "naïve", "İstanbul", "straße", "KELVIN", "dog's", "e-mail", "co-op",
]  # fmt: skip
SEPARATORS = [" ", "  ", ", ", ".", "-", "\n", "\t", "'", "!?", "é", "\u00a0", "—", "_"]
word = st.one_of(
    st.sampled_from(WORDS),
    st.text(alphabet="abcxyz019AZ", min_size=1, max_size=6),
    st.text(max_size=5),  # any unicode, punctuation, empty
)


@st.composite
def texts(draw: st.DrawFn) -> str:
    words = draw(st.lists(word, max_size=14))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(words), max_size=len(words)))
    return "".join(w + s for w, s in zip(words, seps, strict=True))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=texts(), b=texts(), stem=st.booleans())
def test_rouge_l_equals_rouge_score_on_random_text(a: str, b: str, stem: bool) -> None:
    assert tokenize(a, stem=stem) == SCORERS[stem]._tokenizer.tokenize(a)
    assert rouge_l(a, b, stem=stem) == reference(a, b, stem=stem)
    assert rouge_l(b, a, stem=stem) == reference(b, a, stem=stem)


@settings(max_examples=1000, deadline=None)
@given(a=st.text(max_size=40), b=st.text(max_size=40), stem=st.booleans())
def test_rouge_l_equals_rouge_score_on_arbitrary_unicode(a: str, b: str, stem: bool) -> None:
    assert rouge_l(a, b, stem=stem) == reference(a, b, stem=stem)


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(st.text(max_size=60), texts()), stem=st.booleans())
def test_tokenize_equals_rouge_scores_tokenizer(text: str, stem: bool) -> None:
    from rouge_score import tokenize as rs_tokenize

    stemmer = rouge_scorer.tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer if stem else None
    assert rouge_module.tokenize(text, stem=stem) == rs_tokenize.tokenize(text, stemmer)


def _dp_lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@settings(max_examples=500, deadline=None)
@given(
    a=st.lists(st.sampled_from("abcde"), max_size=150),
    b=st.lists(st.sampled_from("abcdef"), max_size=150),
)
def test_lcs_length_is_exact_for_long_sequences(a: list[str], b: list[str]) -> None:
    # Sequences longer than one 64-bit word exercise rapidfuzz's multi-word path.
    assert lcs_length(a, b) == _dp_lcs(a, b)


@settings(max_examples=500, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 300)), min_size=1, max_size=30),
    len_target=st.integers(1, 300),
)
def test_vectorised_fmeasure_has_the_same_bits(
    rows: list[tuple[int, int]], len_target: int
) -> None:
    lcs = np.array([min(lcs, len_pred, len_target) for lcs, len_pred in rows], dtype=np.int64)
    lens = np.array([len_pred for _, len_pred in rows], dtype=np.int64)
    got = _fmeasure_array(lcs, len_target, lens).tolist()
    assert got == [fmeasure(int(x), len_target, int(n)) for x, n in zip(lcs, lens, strict=True)]


def test_empty_and_edge_texts() -> None:
    for a, b in [("", ""), ("", "x"), ("!!!", "x y"), ("a", "a"), ("A.", "a!"), ("ab", "ba")]:
        for stem in (False, True):
            assert rouge_l(a, b, stem=stem) == reference(a, b, stem=stem)
    assert rouge_l("same words here", "same words here") == 1.0
    assert rouge_l("", "") == 0.0


def test_stemming_makes_a_difference() -> None:
    a, b = "running dogs agreed", "run dog agree"
    assert rouge_l(a, b, stem=False) == reference(a, b) < 1.0
    assert rouge_l(a, b, stem=True) == reference(a, b, stem=True) == 1.0


# -- real strings from the reference data ------------------------------------------------


def _jsonl(path: Path) -> Iterator[dict[str, object]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


@pytest.fixture(scope="module")
def ref_dir() -> Path:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    if not shared.is_dir():
        pytest.skip("../shared/reference is not present (fresh clone)")
    return shared


@pytest.fixture(scope="module")
def seeds(ref_dir: Path) -> list[dict[str, object]]:
    return list(_jsonl(ref_dir / "self-instruct" / "seed_tasks.jsonl"))


def _seed_pool(seeds: list[dict[str, object]], kind: str) -> list[str]:
    def has_input(seed: dict[str, object]) -> bool:
        instances = seed["instances"]
        assert isinstance(instances, list)
        return bool(instances[0]["input"])

    want = kind == "io"
    return [str(s["instruction"]) for s in seeds if has_input(s) == want]


@pytest.fixture(scope="module")
def generated(ref_dir: Path) -> dict[str, list[dict[str, object]]]:
    base = ref_dir / "ensemble-instruct"
    return {kind: list(_jsonl(base / f"{kind}_instructions.jsonl")) for kind in ("io", "o")}


@pytest.fixture(scope="module")
def real_texts(
    seeds: list[dict[str, object]], generated: dict[str, list[dict[str, object]]]
) -> list[str]:
    out = [str(s["instruction"]) for s in seeds]
    for rows in generated.values():
        out += [str(r["instruction"]) for r in rows]
    return out


def test_rouge_l_equals_rouge_score_on_real_instructions(real_texts: list[str]) -> None:
    rng = random.Random(0)
    for a in real_texts:
        for b in rng.sample(real_texts, 12):
            for stem in (False, True):
                assert rouge_l(a, b, stem=stem) == reference(a, b, stem=stem), (a, b)


def test_rouge_l_equals_rouge_score_on_consensus_candidates(ref_dir: Path) -> None:
    cases = list(_jsonl(ref_dir / "ensemble-instruct" / "consensus_cases.jsonl"))
    assert len(cases) == 153
    for case in cases:
        cands = case["candidates"]
        assert isinstance(cands, list)
        for i in range(len(cands)):
            for j in range(len(cands)):
                if i != j:  # both orders: the float formula is not symmetric bit for bit
                    a, b = normalize(cands[i]), normalize(cands[j])
                    assert rouge_l(a, b, stem=True) == reference(a, b, stem=True)
                if i < j:
                    assert rouge_l(cands[i], cands[j]) == reference(cands[i], cands[j])


def test_reference_most_similar_scores_are_reproduced(
    seeds: list[dict[str, object]], generated: dict[str, list[dict[str, object]]]
) -> None:
    """The reference pool is the seeds of the type then every earlier generated instruction.

    Its stored instructions keep the trailing " |EoS|", which takes part in the scores.
    """
    seed_count = 0
    for kind, rows in generated.items():
        seed_texts = _seed_pool(seeds, kind)
        seed_set = set(seed_texts)
        novelty = NoveltyFilter(seed_texts)
        for row in rows:
            instruction = str(row["instruction"])
            stored = row["most_similar"]
            assert isinstance(stored, dict) and instruction.endswith(" |EoS|")
            sims = novelty.similarities(instruction)
            by_text = dict(zip(novelty.texts, sims, strict=True))
            for text, value in stored.items():
                assert by_text[text] == value, (instruction, text)
                seed_count += text in seed_set
            assert novelty.max_similarity(instruction) == max(stored.values())
            top = [score for _, score in novelty.top_similar(instruction, 10)]
            assert top == sorted(stored.values(), reverse=True)
            assert float(np.mean(sims)) == row["avg_similarity_score"]
            # Every stored instruction passed the reference's filter.
            assert novelty.offer(instruction)
    assert seed_count > 400  # the seed entries were really checked


def _perturbed(texts: list[str], rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = rng.choice(texts).split()
        for _ in range(rng.randint(0, 3)):
            pos = rng.randrange(len(words))
            if rng.random() < 0.5 and len(words) > 3:
                del words[pos]
            else:
                words.insert(pos, rng.choice(["the", "a", "new", "given", "list"]))
        out.append(" ".join(words))
    return out


def test_novelty_filter_matches_brute_force_rouge_score(
    seeds: list[dict[str, object]], generated: dict[str, list[dict[str, object]]]
) -> None:
    rng = random.Random(1)
    pool = _seed_pool(seeds, "io")
    instructions = [str(r["instruction"]).removesuffix(" |EoS|") for r in generated["io"]]
    instructions += [str(r["instruction"]).removesuffix(" |EoS|") for r in generated["o"]]
    candidates = instructions + _perturbed(pool + instructions, rng, 120)
    rng.shuffle(candidates)
    novelty = NoveltyFilter(pool)
    brute = [tokens_of(p) for p in pool]
    accepted = rejected = 0
    for cand in candidates:
        tokens = tokens_of(cand)
        best = brute_max_tokens(tokens, brute)
        assert novelty.max_similarity(cand) == best
        ok = novelty.offer(cand)
        assert ok == (best <= 0.7)
        if ok:
            brute.append(tokens)
            accepted += 1
        else:
            rejected += 1
        assert len(novelty) == len(brute)
    assert accepted > 50 and rejected > 50  # both decisions were exercised


# -- the 0.7 boundary ---------------------------------------------------------------------


def _pair(lcs: int, len_a: int, len_b: int) -> tuple[str, str]:
    shared = [f"w{i}" for i in range(lcs)]
    a = shared + [f"a{i}" for i in range(len_a - lcs)]
    b = shared + [f"b{i}" for i in range(len_b - lcs)]
    return " ".join(a), " ".join(b)


def test_exactly_point_seven_passes() -> None:
    a, b = _pair(7, 10, 10)
    assert reference(a, b) == 0.7  # the premise: rouge_score says exactly 0.7
    novelty = NoveltyFilter([b], threshold=0.7)
    assert novelty.max_similarity(a) == 0.7
    assert novelty.offer(a) is True
    assert len(novelty) == 2


def test_rounding_above_point_seven_is_rejected_like_rouge_score() -> None:
    # 2*7/(9+11) is 0.7 on paper, but rouge_score's float arithmetic lands just above it:
    # the filter must follow the arithmetic, not the fraction.
    a, b = _pair(7, 9, 11)
    assert reference(a, b) > 0.7
    for prune in (True, False):
        novelty = NoveltyFilter([b], threshold=0.7, prune=prune)
        assert novelty.max_similarity(a) == reference(a, b)
        assert novelty.offer(a) is False
        assert len(novelty) == 1


# -- pruning never changes a decision ------------------------------------------------------

small_text = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "ab", "cd"]), max_size=12).map(
    " ".join
)


@settings(max_examples=300, deadline=None)
@given(
    pool=st.lists(small_text, max_size=40),
    offers=st.lists(small_text, min_size=1, max_size=40),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 1.0]),
    stem=st.booleans(),
)
def test_pruning_never_changes_a_decision(
    pool: list[str], offers: list[str], threshold: float, stem: bool
) -> None:
    fast = NoveltyFilter(pool, threshold=threshold, stem=stem)
    slow = NoveltyFilter(pool, threshold=threshold, stem=stem, prune=False)
    brute = list(pool)
    for text in offers:
        best = brute_max(text, brute, stem=stem)
        assert fast.max_similarity(text) == slow.max_similarity(text) == best
        assert fast.similarities(text) == slow.similarities(text)
        decision = fast.offer(text)
        assert decision == slow.offer(text) == (best <= threshold)
        if decision:
            brute.append(text)
    assert fast.texts == slow.texts == tuple(brute)


@settings(max_examples=300, deadline=None)
@given(
    pool=st.lists(small_text, max_size=40),
    offers=st.lists(small_text, min_size=1, max_size=30),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 2 / 3, 0.7, 0.8, 1.0]),
    prune=st.booleans(),
)
def test_judge_equals_the_separate_calls(
    pool: list[str], offers: list[str], threshold: float, prune: bool
) -> None:
    """One pass gives the decision, the exact maximum and the most similar entry that
    is_novel, max_similarity and top_similar give one by one (ties: the earliest)."""
    novelty = NoveltyFilter(pool, threshold=threshold, prune=prune)
    for text in offers:
        novel, score, similar = novelty.judge(text)
        assert novel == novelty.is_novel(text)
        assert score == novelty.max_similarity(text)
        if novel:
            assert similar is None
            assert novelty.judge(text, score=False) == (True, None, None)
        else:
            assert similar == novelty.top_similar(text, 1)[0][0]
            assert novelty.judge(text, score=False) == (novel, score, similar)
        if novel:
            novelty.add(text)


def test_judge_at_exactly_the_threshold_and_on_ties() -> None:
    a, b = _pair(7, 10, 10)
    novelty = NoveltyFilter([b], threshold=0.7)
    assert novelty.judge(a) == (True, 0.7, None)  # exactly 0.7 passes
    twin = NoveltyFilter(["p q", "x y z w", "x y z v"], threshold=0.5)
    best = reference("x y z", "x y z w")
    assert best == reference("x y z", "x y z v") > 0.5  # the premise: a tie
    assert twin.judge("x y z") == (False, best, "x y z w")
    assert twin.judge("") == (True, 0.0, None)


def test_many_candidates_use_the_vectorised_path() -> None:
    # More candidates above the bound than the scalar batch: the cdist path decides.
    rng = random.Random(3)
    vocab = [f"t{i}" for i in range(12)]
    pool = [" ".join(rng.choices(vocab, k=10)) for _ in range(400)]
    fast = NoveltyFilter(pool)
    slow = NoveltyFilter(pool, prune=False)
    for _ in range(30):
        text = " ".join(rng.choices(vocab, k=10))
        assert fast.max_similarity(text) == slow.max_similarity(text)
        assert fast.is_novel(text) == slow.is_novel(text)
        assert fast.similarities(text) == slow.similarities(text)


def test_more_tokens_than_code_points_falls_back_to_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(NoveltyFilter, "_max_code", 5)
    texts = ["alpha beta gamma", "beta gamma delta", "one two three four five six seven"]
    novelty = NoveltyFilter(texts[:2])
    assert novelty._as_text
    novelty.add(texts[2])  # the vocabulary now exceeds 5 ids
    assert not novelty._as_text
    for query in ["beta gamma delta epsilon", "two three four", "zeta"]:
        assert novelty.max_similarity(query) == brute_max(query, texts)
        assert novelty.similarities(query) == [reference(query, t) for t in texts]


# -- API details --------------------------------------------------------------------------


def test_empty_pool_and_empty_text() -> None:
    novelty = NoveltyFilter()
    assert len(novelty) == 0
    assert novelty.max_similarity("anything") == 0.0
    assert novelty.top_similar("anything") == []
    assert novelty.offer("write a poem") is True
    assert novelty.max_similarity("") == 0.0
    assert novelty.offer("...") is True  # no tokens: scores 0 against everything
    assert list(novelty) == ["write a poem", "..."]


def test_rejected_texts_are_not_added() -> None:
    novelty = NoveltyFilter(["write a poem about the sea"])
    assert novelty.offer("Write a poem about the sea!") is False
    assert len(novelty) == 1
    assert novelty.offer("list three prime numbers") is True
    assert len(novelty) == 2


def test_top_similar_orders_by_score_then_pool_order() -> None:
    pool = ["a b c d", "x y z", "a b c d", "a b", "q r"]
    novelty = NoveltyFilter(pool)
    top = novelty.top_similar("a b c d", 4)
    assert [t for t, _ in top] == ["a b c d", "a b c d", "a b", "x y z"]
    assert [s for _, s in top] == [reference("a b c d", t) for t, _ in top]
    assert novelty.top_similar("a b", 0) == []
    assert len(novelty.top_similar("a b", 50)) == len(pool)


def test_token_ids_in_the_surrogate_range_still_match_exactly() -> None:
    # Over 55,296 distinct tokens: later ids are encoded as surrogate code points.
    filler = " ".join(f"f{i}" for i in range(0xD800 + 10))
    pool = [filler, "alpha beta gamma delta", "beta gamma epsilon", "zeta eta theta"]
    novelty = NoveltyFilter(pool)
    assert novelty._vocab["alpha"] > 0xD800
    for query in ["alpha beta gamma", "gamma epsilon zeta theta", "f1 f2 alpha f55300"]:
        expected = [reference(query, p) for p in pool]
        assert novelty.similarities(query) == expected
        assert novelty.max_similarity(query) == max(expected)


# -- the prefix filter: exact decisions at any pool size ----------------------------------


def _brute_novel(text: str, pool: list[str], threshold: float, stem: bool = False) -> bool:
    return all(reference(text, p, stem=stem) <= threshold for p in pool)


near_vocab = [f"w{i}" for i in range(30)] + ["the", "a", "of", "write", "list"]
near_text = st.lists(st.sampled_from(near_vocab), min_size=0, max_size=16).map(" ".join)


@st.composite
def offers_with_near_duplicates(draw: st.DrawFn) -> list[str]:
    """Fresh texts, near duplicates of earlier ones, and exact repeats."""
    out: list[str] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["fresh", "near", "same"])) if out else "fresh"
        if kind == "fresh":
            out.append(draw(near_text))
            continue
        words = draw(st.sampled_from(out)).split()
        if kind == "near" and words:
            pos = draw(st.integers(0, len(words) - 1))
            op = draw(st.sampled_from(["drop", "insert", "replace"]))
            if op == "drop":
                del words[pos]
            elif op == "insert":
                words.insert(pos, draw(st.sampled_from(near_vocab)))
            else:
                words[pos] = draw(st.sampled_from(near_vocab))
        out.append(" ".join(words))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(near_text, max_size=12),
    offers=offers_with_near_duplicates(),
    threshold=st.sampled_from([0.0, 0.25, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 0.9, 1.0]),
    rerank_at=st.sampled_from([(), (3,), (2, 7, 15), (1, 2, 3, 4, 5, 8, 13)]),
)
def test_prefix_filter_decisions_equal_brute_force(
    pool: list[str],
    offers: list[str],
    threshold: float,
    rerank_at: tuple[int, ...],
) -> None:
    # Re-ranking the global order is patched to happen at small pool sizes, so the index
    # is rebuilt under a new order in the middle of the sequence.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rouge_module, "_RERANK_AT", rerank_at)
        novelty = NoveltyFilter(pool, threshold=threshold)
        brute = list(pool)
        for text in offers:
            expected = _brute_novel(text, brute, threshold)
            assert novelty.is_novel(text) == expected
            assert novelty.offer(text) == expected
            if expected:
                brute.append(text)
        assert novelty.texts == tuple(brute)


def test_texts_exactly_at_the_threshold_pass_at_every_length() -> None:
    # For every pair of lengths where rouge_score's arithmetic lands exactly on 0.7 (and
    # every pair where it lands just above it), the prefix filter decides as rouge_score.
    cases = 0
    for la in range(1, 41):
        for lb in range(1, 41):
            for lcs in range(1, min(la, lb) + 1):
                score = fmeasure(lcs, la, lb)
                if abs(score - 0.7) > 1e-12:
                    continue
                a, b = _pair(lcs, la, lb)
                assert reference(a, b) == score
                # Shared words first or last (same LCS): they land anywhere in the order.
                words = b.split()
                for pool_text in (b, " ".join(words[lcs:] + words[:lcs])):
                    novelty = NoveltyFilter([pool_text, "unrelated words only"], threshold=0.7)
                    assert novelty.is_novel(a) == (score <= 0.7), (lcs, la, lb)
                cases += 1
    assert cases > 10  # both exact 0.7 and rounded-above cases were met


def test_threshold_changes_rebuild_the_prefix_index() -> None:
    a, b = _pair(6, 10, 10)  # ROUGE-L 0.6
    novelty = NoveltyFilter([b], threshold=0.7)
    assert novelty.is_novel(a)
    novelty.threshold = 0.5
    assert not novelty.is_novel(a)
    novelty.threshold = -0.5  # every score, even 0.0, is above it
    assert not novelty.is_novel("nothing in common")
    assert novelty.is_novel("")  # no tokens: scores 0, and 0 > -0.5, but nothing to score
    novelty.threshold = 0.6
    assert novelty.offer(a)
    assert len(novelty) == 2


def test_saturated_sketch_buckets_keep_the_bound_safe() -> None:
    # 300 repeats of one word overflow its sketch bucket; the filter must still see them.
    long_text = " ".join(["echo"] * 300)
    novelty = NoveltyFilter([long_text], threshold=0.7)
    assert not novelty.is_novel(" ".join(["echo"] * 290))
    assert novelty.is_novel(" ".join(["echo"] * 100))
    assert novelty.is_novel(" ".join(["echo"] * 100)) == _brute_novel(
        " ".join(["echo"] * 100), [long_text], 0.7
    )


def _zipf_instructions(n: int, seed: int) -> list[str]:
    """Instruction-like texts with a Zipf vocabulary and 15% near duplicates."""
    rng = random.Random(seed)
    vocab = [f"v{i}" for i in range(3000)]
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    openings = ["write a poem about", "explain why", "list three", "classify the", "give me"]
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.15:
            words = rng.choice(out[-300:]).split()
            pos = rng.randrange(len(words))
            if rng.random() < 0.5 and len(words) > 3:
                del words[pos]
            else:
                words.insert(pos, rng.choices(vocab, weights)[0])
            out.append(" ".join(words))
        else:
            k = rng.randint(3, 14)
            out.append(f"{rng.choice(openings)} {' '.join(rng.choices(vocab, weights, k=k))}")
    return out


def test_decisions_at_scale_equal_brute_force() -> None:
    # 3,000 offers, with the global order re-ranked twice on the way (at 100 and 1,024 pool
    # entries): every decision equals a brute force over the whole pool (rouge_score's
    # tokenizer, every pair's LCS, rouge_score's formula), and rouge_score itself confirms
    # the score of each offer's best pair.
    texts = _zipf_instructions(3000, seed=5)
    ids: dict[str, int] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rouge_module, "_RERANK_AT", (100, 1024))
        novelty = NoveltyFilter(threshold=0.7)
        pool: list[str] = []
        pool_seqs: list[list[int]] = []
        rejected = 0
        for text in texts:
            seq = [ids.setdefault(t, len(ids)) for t in tokens_of(text)]
            best = 0.0
            if pool_seqs:
                lcs = process.cdist([seq], pool_seqs, scorer=LCSseq.similarity)[0]
                scores = [
                    fmeasure(int(x), len(seq), len(p)) for x, p in zip(lcs, pool_seqs, strict=True)
                ]
                arg = max(range(len(scores)), key=scores.__getitem__)
                best = scores[arg]
                assert best == reference(text, pool[arg])
            expected = best <= 0.7
            assert novelty.offer(text) == expected, text
            if expected:
                pool.append(text)
                pool_seqs.append(seq)
            else:
                rejected += 1
    assert novelty.texts == tuple(pool)
    assert len(pool) > 1024
    assert rejected > 100  # near duplicates were really rejected


def test_turning_pruning_on_later_stays_exact() -> None:
    texts = _zipf_instructions(300, seed=9)
    novelty = NoveltyFilter(texts[:200], prune=False)
    novelty.prune = True
    brute = list(novelty.texts)
    for text in texts[200:]:
        expected = _brute_novel(text, brute, 0.7)
        assert novelty.offer(text) == expected
        if expected:
            brute.append(text)
