"""ensemble_async.consensus: the batch rule, the reference cases, the incremental selector."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from ensemble_async.consensus import (
    RULES,
    IncrementalSelector,
    Selection,
    normalize,
    reference_similarity,
    select,
)

STEM_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

# -- the 153 reference cases ---------------------------------------------------------------


def _cases() -> list[dict[str, object]]:
    path = (
        Path(__file__).resolve().parents[1].parent
        / "shared"
        / "reference"
        / "ensemble-instruct"
        / "consensus_cases.jsonl"
    )
    if not path.is_file():
        pytest.skip("../shared/reference is not present (fresh clone)")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_reference_cases_reproduce_expected_index() -> None:
    cases = _cases()
    assert len(cases) == 153
    kept = 0
    rules: set[str] = set()
    for case in cases:
        candidates = case["candidates"]
        assert isinstance(candidates, list)
        sel = select(candidates)
        assert sel.index == case["expected_index"], candidates
        rules.add(sel.rule)
        if sel.index is not None:
            kept += 1
            assert sel.text == candidates[sel.index].strip()
        else:
            assert sel.text is None
    assert kept == 104
    assert {"shortcut-first", "shortcut-pair", "medoid", "below-threshold"} <= rules


def test_reference_cases_through_the_incremental_selector() -> None:
    for case in _cases():
        candidates = case["candidates"]
        assert isinstance(candidates, list)
        for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
            inc = IncrementalSelector(3)
            decision = None
            for i in order:
                decision = inc.add(i, candidates[i]) or decision
                if decision is not None:
                    break
            assert decision is not None
            assert decision.index == case["expected_index"]


# -- an independent oracle for three candidates ---------------------------------------------


def _oracle_three(c: list[str]) -> int | None:
    """The reference's three-way code path, with SPEC's fixes (1 == 2 keeps 1; no empty)."""
    n = [normalize(x) for x in c]

    def r(pred: str, target: str) -> float:
        score: float = STEM_SCORER.score(target, pred)["rougeL"].fmeasure
        return score

    if n[0] == n[1] or n[0] == n[2]:
        winner: int | None = 0
    elif n[1] == n[2]:
        winner = 1
    else:
        s01, s02, s12 = r(n[0], n[1]), r(n[0], n[2]), r(n[1], n[2])
        sums = [s01 + s02, s01 + s12, s02 + s12]
        winner = None
        if min(s01, s02, s12) > 0.01:
            winner = 0 if sums[0] >= max(sums) else 1 if sums[1] >= sums[2] else 2
    if winner is not None and not n[winner]:
        return None  # an empty winner is discarded
    return winner


PHRASES = [
    "Yes",
    "yes.",
    "No",
    "",
    "  ",
    "...",
    "?!",
    "The cat sat on the mat.",
    "the cat sat on the mat",
    "A cat was sitting on a mat",
    "Cats sit on mats.",
    "The dog ran home",
    "dogs running home quickly",
    "42",
    "forty two",
    "Paris, France",
    "paris france",
]
candidate = st.one_of(st.sampled_from(PHRASES), st.text(max_size=12))


@settings(max_examples=400, deadline=None)
@given(c=st.lists(candidate, min_size=3, max_size=3))
def test_three_candidates_match_the_reference_rule(c: list[str]) -> None:
    sel = select(c)
    assert sel.index == _oracle_three(c)
    assert sel.rule in RULES


# -- each rule -------------------------------------------------------------------------------


def test_normalize() -> None:
    assert normalize("  Hello,   World!\n") == "hello world"
    assert normalize("It's-a\tme...") == "itsa me"
    assert normalize("!!!") == ""
    assert normalize("Ünïcode—dash") == "ünïcode—dash"  # only ASCII punctuation goes


def test_shortcut_first() -> None:
    sel = select(["  Yes. ", "no", "YES"])
    assert (sel.index, sel.text, sel.rule) == (0, "Yes.", "shortcut-first")
    assert sel.pairwise == {} and sel.scores == {}


def test_shortcut_pair_prefers_the_lowest_index() -> None:
    assert select(["a", "b", "B!"]).rule == "shortcut-pair"
    assert select(["a", "b", "B!"]).index == 1
    assert select(["a", "b", "c", "b"]).index == 1
    assert select(["a", "b", "c", "c"]).index == 2
    assert select(["a", "b", "c", "a", "b"]).index == 0
    assert select(["x", "y", "z", "y", "z"]).index == 1


def test_empty_outputs_never_agree() -> None:
    # Two empty (or punctuation-only) outputs agree on nothing: the later real agreement wins.
    sel = select(["", "...", "paris", "Paris."])
    assert (sel.index, sel.rule) == (2, "shortcut-pair")
    sel = select(["!!", "?", "a b c", "a b d"])
    assert sel.index is None and sel.rule == "below-threshold"


def test_medoid_picks_the_most_central_candidate() -> None:
    c = ["The cat sat on the mat.", "A cat sat on a mat!", "The dog barked at the cat."]
    sel = select(c)
    assert sel.rule == "medoid"
    assert set(sel.pairwise) == {(0, 1), (0, 2), (1, 2)}
    n = [normalize(x) for x in c]
    for (i, j), s in sel.pairwise.items():
        assert s == STEM_SCORER.score(n[j], n[i])["rougeL"].fmeasure
    expected_scores = {
        0: sel.pairwise[(0, 1)] + sel.pairwise[(0, 2)],
        1: sel.pairwise[(0, 1)] + sel.pairwise[(1, 2)],
        2: sel.pairwise[(0, 2)] + sel.pairwise[(1, 2)],
    }
    assert sel.scores == expected_scores
    best = max(expected_scores, key=lambda i: (expected_scores[i], -i))
    assert sel.index == sel.best == best
    assert sel.text == c[best].strip()
    assert sel.min_pairwise == min(sel.pairwise.values())


def _table(table: dict[tuple[int, int], float], texts: list[str]) -> Callable[[str, str], float]:
    """A similarity function that looks a pair up by the candidates' normalised texts."""
    where = {normalize(t): i for i, t in enumerate(texts)}

    def sim(x: str, y: str) -> float:
        i, j = where[x], where[y]
        return table[(min(i, j), max(i, j))]

    return sim


def test_ties_go_to_the_lowest_index() -> None:
    texts = ["alpha", "beta", "gamma"]
    sel = select(texts, similarity=lambda x, y: 0.5)
    assert (sel.index, sel.rule) == (0, "medoid")
    table = {(0, 1): 0.2, (0, 2): 0.2, (1, 2): 0.6}
    sel = select(texts, similarity=_table(table, texts))
    assert sel.scores == {0: 0.4, 1: 0.8, 2: 0.8}
    assert sel.index == 1


def test_threshold_is_strict() -> None:
    texts = ["alpha", "beta", "gamma"]
    low = {(0, 1): 0.9, (0, 2): 0.01, (1, 2): 0.9}
    sel = select(texts, similarity=_table(low, texts))
    assert (sel.index, sel.rule, sel.best) == (None, "below-threshold", 1)
    assert sel.min_pairwise == 0.01
    sel = select(texts, similarity=_table(low, texts), threshold=0.005)
    assert (sel.index, sel.rule) == (1, "medoid")


def test_a_pair_scored_nan_is_not_an_agreement_wherever_it_sits() -> None:
    """A similarity that cannot score a pair (NaN, e.g. a cosine of a zero vector) must
    discard the item whatever the pair's position, never pass the threshold unseen."""
    for texts in (["alpha", "beta", "gamma"], ["gamma", "alpha", "beta"]):
        table = {
            (i, j): math.nan if "gamma" in (texts[i], texts[j]) else 0.9
            for i in range(3)
            for j in range(i + 1, 3)
        }
        sel = select(texts, similarity=_table(table, texts))
        assert (sel.index, sel.rule) == (None, "below-threshold")
        assert sel.min_pairwise is not None and math.isnan(sel.min_pairwise)


def test_weights_multiply_each_candidates_contributions() -> None:
    texts = ["alpha", "beta", "gamma"]
    table = {(0, 1): 0.9, (0, 2): 0.1, (1, 2): 0.5}
    plain = select(texts, similarity=_table(table, texts))
    assert plain.index == 1
    weighted = select(texts, similarity=_table(table, texts), weights=[1.0, 5.0, 0.1])
    assert weighted.scores == {
        0: 5.0 * 0.9 + 0.1 * 0.1,
        1: 1.0 * 0.9 + 0.1 * 0.5,
        2: 0.1 + 5.0 * 0.5,
    }
    assert weighted.index == 0
    with pytest.raises(ValueError, match="entries"):
        select(texts, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        select(texts, weights=[1.0, -1.0, 1.0])


def test_custom_similarity_sees_normalised_pairs_in_order() -> None:
    calls: list[tuple[str, str]] = []

    def sim(x: str, y: str) -> float:
        calls.append((x, y))
        return 0.5

    select(["One!", "Two.", "THREE"], similarity=sim)
    assert calls == [("one", "two"), ("one", "three"), ("two", "three")]


def test_default_similarity_is_the_reference_call() -> None:
    x, y = "the cats are running", "a cat runs"
    assert reference_similarity(x, y) == STEM_SCORER.score(y, x)["rougeL"].fmeasure


def test_single_none_and_empty() -> None:
    assert select([]).rule == "none" and select([]).index is None
    sel = select(["  only answer \n"])
    assert (sel.index, sel.text, sel.rule) == (0, "only answer", "single")
    for blank in ["", "   ", "?!"]:
        sel = select([blank])
        assert (sel.index, sel.text, sel.rule) == (None, None, "empty")


def test_an_empty_medoid_winner_is_discarded() -> None:
    sel = select(["--", "alpha", "beta"], similarity=lambda x, y: 1.0)
    assert (sel.index, sel.rule, sel.best) == (None, "empty", 0)


def test_to_dict_is_json_ready() -> None:
    sel = select(["The cat sat.", "A cat sat.", "The dog sat."])
    record = json.loads(json.dumps(sel.to_dict()))
    assert record["index"] == sel.index and record["rule"] == sel.rule
    assert {(i, j): s for i, j, s in record["pairwise"]} == sel.pairwise
    assert dict(record["scores"]) == sel.scores
    assert isinstance(sel, Selection) and sel.kept == (sel.index is not None)


# -- the incremental selector ------------------------------------------------------------------


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[str], list[int], set[int]]:
    texts = draw(st.lists(st.sampled_from(PHRASES), max_size=6))
    order = draw(st.permutations(list(range(len(texts)))))
    failed = draw(st.sets(st.sampled_from(range(len(texts))))) if texts else set()
    return texts, list(order), failed


def _same(a: Selection, b: Selection) -> bool:
    return (a.index, a.text, a.rule) == (b.index, b.text, b.rule)


@settings(max_examples=400, deadline=None)
@given(data=arrivals())
def test_exact_policy_equals_batch_select_for_any_arrival_order(
    data: tuple[list[str], list[int], set[int]],
) -> None:
    texts, order, failed = data
    kept = [i for i in range(len(texts)) if i not in failed]
    batch = select([texts[i] for i in kept])
    # select() numbers the survivors 0..k-1; map back to the original indices.
    expected_index = None if batch.index is None else kept[batch.index]

    inc = IncrementalSelector(len(texts))
    decision = None
    for step, i in enumerate(order):
        got = inc.fail(i) if i in failed else inc.add(i, texts[i])
        if got is not None:
            decision = got
            assert decision.early == (step < len(order) - 1)
            break
    if not texts:
        decision = inc.finalize()
    assert decision is not None  # decided at the latest with the last candidate
    assert decision.index == expected_index
    assert decision.text == batch.text
    assert decision.selection.rule == batch.rule
    assert inc.finalize() is decision


@settings(max_examples=400, deadline=None)
@given(data=arrivals(), minimum=st.integers(1, 6), policy=st.sampled_from(["exact", "quorum"]))
def test_min_candidates_for_any_arrival_order(
    data: tuple[list[str], list[int], set[int]], minimum: int, policy: str
) -> None:
    """With a minimum, ``exact`` decides what waiting for everyone gives (too few arrived:
    ``too-few-candidates``), and no policy ever decides on fewer arrived candidates."""
    texts, order, failed = data
    if not texts:
        return
    minimum = min(minimum, len(texts))
    own_fault = {i for i in failed if i % 2}  # failed for its own reason: an answer
    kept = [i for i in range(len(texts)) if i not in failed]
    batch = select([texts[i] for i in kept])
    inc = IncrementalSelector(len(texts), policy=policy, min_candidates=minimum)  # type: ignore[arg-type]
    decision = None
    answered = 0
    for i in order:
        unavailable = i not in own_fault
        got = inc.fail(i, unavailable=unavailable) if i in failed else inc.add(i, texts[i])
        answered += i not in failed or i in own_fault
        if got is not None:
            decision = got
            break
    assert decision is not None
    rule = decision.selection.rule
    if len(kept) + len(own_fault) < minimum:
        assert rule == "too-few-candidates" and decision.index is None
    else:
        assert rule != "too-few-candidates"
        assert answered >= minimum
        if policy == "exact":
            assert decision.index == (None if batch.index is None else kept[batch.index])
            assert rule == batch.rule


@st.composite
def weighted_arrivals(
    draw: st.DrawFn,
) -> tuple[list[str], list[int], list[str], list[float] | None, int | None, int]:
    """Candidates (with non-ASCII ones that tokenise to nothing), an arrival order, each
    candidate's fate, weights, a minimum, and the step at which the selector is pickled."""
    texts = draw(st.lists(st.sampled_from([*PHRASES, "日本", "é", "runs", "running"]), max_size=6))
    n = len(texts)
    order = draw(st.permutations(list(range(n))))
    fates = draw(
        st.lists(st.sampled_from(["ok", "ok", "unavailable", "own"]), min_size=n, max_size=n)
    )
    weights = draw(
        st.none() | st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n, max_size=n)
    )
    minimum = draw(st.none() | st.integers(1, max(1, n)))
    return texts, list(order), fates, weights, minimum, draw(st.integers(0, n))


@settings(max_examples=300, deadline=None)
@given(data=weighted_arrivals())
def test_exact_policy_with_weights_failures_minimum_and_a_pickled_copy(
    data: tuple[list[str], list[int], list[str], list[float] | None, int | None, int],
) -> None:
    """Whatever arrives, fails or travels to another process, ``exact`` decides what
    :func:`select` decides on the candidates that arrive, or too few."""
    import pickle

    texts, order, fates, weights, minimum, pickled_at = data
    arrived = [i for i in range(len(texts)) if fates[i] == "ok"]
    batch = select(
        [texts[i] for i in arrived],
        weights=None if weights is None else [weights[i] for i in arrived],
    )
    inc = IncrementalSelector(len(texts), weights=weights, min_candidates=minimum)
    decision = None
    for step, i in enumerate(order):
        if step == pickled_at:
            inc = pickle.loads(pickle.dumps(inc))
        if fates[i] == "ok":
            decision = inc.add(i, texts[i])
        else:
            decision = inc.fail(i, unavailable=fates[i] == "unavailable")
        if decision is not None:
            break
    decision = decision or inc.finalize()
    answered = len(arrived) + fates.count("own")
    if minimum is not None and answered < minimum:
        assert decision.selection.rule == "too-few-candidates" and decision.index is None
    else:
        assert decision.index == (None if batch.index is None else arrived[batch.index])
        assert (decision.text, decision.selection.rule) == (batch.text, batch.rule)
    assert inc.finalize() is decision


def test_min_candidates_is_validated() -> None:
    with pytest.raises(ValueError, match="min_candidates"):
        IncrementalSelector(3, min_candidates=4)
    with pytest.raises(ValueError, match="min_candidates"):
        IncrementalSelector(3, min_candidates=0)


def test_deadline_below_the_minimum_is_too_few() -> None:
    inc = IncrementalSelector(3, policy="deadline", min_candidates=2)
    assert inc.add(0, "same answer") is None
    decision = inc.finalize()
    assert decision.selection.rule == "too-few-candidates" and decision.early


def test_exact_policy_decides_as_soon_as_rule_one_fires() -> None:
    inc = IncrementalSelector(4)
    assert inc.add(2, "Yes!") is None
    decision = inc.add(0, "yes")
    assert decision is not None and decision.early
    assert (decision.index, decision.text, decision.selection.rule) == (0, "yes", "shortcut-first")
    assert decision.arrived == (0, 2)
    assert inc.missing == [1, 3]
    assert inc.add(1, "no") is decision  # later arrivals do not change it


def test_exact_policy_waits_when_a_lower_candidate_could_still_win() -> None:
    inc = IncrementalSelector(3)
    assert inc.add(1, "yes") is None
    assert inc.add(2, "yes") is None  # candidate 0 could still equal them: rule 1
    decision = inc.add(0, "no")
    assert decision is not None and not decision.early
    assert (decision.index, decision.selection.rule) == (1, "shortcut-pair")


def test_exact_policy_with_a_failed_candidate() -> None:
    inc = IncrementalSelector(3)
    assert inc.add(1, "paris") is None
    assert inc.add(2, "Paris.") is None
    decision = inc.fail(0)
    assert decision is not None and decision.index == 1


def test_quorum_policy_decides_on_agreement() -> None:
    inc = IncrementalSelector(4, policy="quorum")
    assert inc.add(3, "Paris") is None
    decision = inc.add(2, "paris.")
    assert decision is not None and decision.early
    assert (decision.index, decision.text, decision.selection.rule) == (2, "paris.", "quorum")

    # Three of five close enough (ROUGE-L >= 0.5): the best supported one wins at once.
    loose = IncrementalSelector(5, policy="quorum", quorum=3, agreement=0.5)
    assert loose.add(0, "the cat sat on the mat") is None
    assert loose.add(4, "something else entirely") is None
    assert loose.add(2, "a cat sat on a mat") is None
    decision = loose.add(1, "the cat sat on a mat")
    assert decision is not None and decision.early and decision.index == 1
    assert decision.arrived == (0, 1, 2, 4)


def test_an_empty_candidate_never_backs_a_quorum() -> None:
    """Even at ``agreement=0`` an empty output agrees with nothing, so it cannot make up
    a quorum for a lone answer."""
    inc = IncrementalSelector(4, policy="quorum", agreement=0.0)
    assert inc.add(0, "yes") is None
    assert inc.add(1, "?!") is None
    decision = inc.add(2, "no")
    assert decision is not None and decision.selection.rule == "quorum"
    assert decision.arrived == (0, 1, 2) and decision.index == 0  # 0 and 2 back each other


def test_quorum_falls_back_to_the_batch_rule() -> None:
    inc = IncrementalSelector(3, policy="quorum")
    assert inc.add(0, "alpha beta") is None
    assert inc.add(1, "gamma delta") is None
    decision = inc.add(2, "epsilon")
    assert decision is not None and not decision.early
    assert _same(decision.selection, select(["alpha beta", "gamma delta", "epsilon"]))


def test_deadline_policy_decides_on_finalize() -> None:
    inc = IncrementalSelector(3, policy="deadline")
    assert inc.add(1, "yes") is None
    assert inc.add(2, "yes") is None  # deadline never decides early
    assert not inc.done
    decision = inc.finalize()
    assert decision.early and decision.arrived == (1, 2)
    assert (decision.index, decision.selection.rule) == (1, "shortcut-first")
    assert inc.finalize() is decision
    assert inc.add(0, "no") is decision


def test_incremental_reuses_scores_and_validates() -> None:
    calls: list[tuple[str, str]] = []

    def sim(x: str, y: str) -> float:
        calls.append((x, y))
        return 0.5

    inc = IncrementalSelector(3, similarity=sim)
    inc.add(0, "a")
    inc.add(1, "b")
    decision = inc.add(2, "c")
    assert decision is not None and decision.index == 0
    assert sorted(calls) == [("a", "b"), ("a", "c"), ("b", "c")]  # each pair scored once

    with pytest.raises(ValueError, match="already"):
        inc.add(0, "again")
    with pytest.raises(IndexError):
        IncrementalSelector(2).add(2, "x")
    with pytest.raises(ValueError, match="policy"):
        IncrementalSelector(2, policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quorum"):
        IncrementalSelector(2, quorum=1)
    assert IncrementalSelector(0).finalize().selection.rule == "none"


def test_each_candidate_is_tokenised_once_not_once_per_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default similarity tokenises (and stems) a candidate once per decision, and the
    pair scores computed from those tokens are exactly the reference's, pair by pair."""
    from ensemble_async.rouge import tokenize as real

    calls: list[str] = []

    def counting(text: str, *, stem: bool = False) -> list[str]:
        calls.append(text)
        return real(text, stem=stem)

    monkeypatch.setattr("ensemble_async.consensus.tokenize", counting)
    candidates = [
        "The river runs to the sea.",
        "Rivers run into seas, mostly.",
        "A river flows toward the ocean.",
        "Mountains are tall.",
        "",
    ]
    selection = select(candidates)
    assert selection.rule in ("medoid", "below-threshold")
    assert len(calls) == len(candidates)  # 10 pairs, 5 tokenisations
    norms = [normalize(c) for c in candidates]
    for (i, j), score in selection.pairwise.items():
        assert score == reference_similarity(norms[i], norms[j])

    calls.clear()
    selector = IncrementalSelector(len(candidates), policy="quorum", quorum=3, agreement=0.9)
    for i, text in enumerate(candidates):
        selector.add(i, text)
    decision = selector.finalize()
    assert len(calls) == len(candidates)
    for (i, j), score in decision.selection.pairwise.items():
        assert score == reference_similarity(norms[i], norms[j])


def test_a_custom_similarity_is_called_once_per_pair_on_normalised_texts() -> None:
    seen: list[tuple[str, str]] = []

    def similarity(x: str, y: str) -> float:
        seen.append((x, y))
        return 0.5

    selection = select(["One, two.", "Three four", "five six"], similarity=similarity)
    assert selection.rule == "medoid"
    assert sorted(seen) == sorted(
        [("one two", "three four"), ("one two", "five six"), ("three four", "five six")]
    )


def test_finalize_complete_leaves_the_decision_to_finalize_and_a_pickled_copy_makes_it() -> None:
    import pickle

    texts = ["The cat sat on the mat.", "A cat sat on a mat", "Dogs bark loudly at night"]
    plain = IncrementalSelector(3)
    held = IncrementalSelector(3, finalize_complete=True)
    for i, text in enumerate(texts):
        plain.add(i, text)
        assert held.add(i, text) is None  # complete, yet not decided inside add
    assert plain.done and not held.done
    copy = pickle.loads(pickle.dumps(held))  # as another process receives it
    assert copy.finalize() == plain.decision == held.finalize()
    assert plain.decision is not None and not plain.decision.early
