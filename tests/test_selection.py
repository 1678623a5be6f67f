"""Selection policies: consensus unchanged, target fit (GRAPE), and consensus+target-fit."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble_async.consensus import normalize, reference_similarity, select
from ensemble_async.scoring import CompletionScore
from ensemble_async.selection import SelectionConfig, choose, fit_score


def scored(text: str, *logprobs: float) -> CompletionScore:
    return CompletionScore(text=text, token_logprobs=tuple(logprobs))


CANDIDATES = [
    "Paris is the capital of France.",
    "The capital of France is Paris.",
    "Paris, the capital city of France.",
]


def test_consensus_policy_is_todays_rule() -> None:
    consensus = select(CANDIDATES)
    got = choose(CANDIDATES, consensus, {}, SelectionConfig())
    assert (got.index, got.text, got.rule) == (consensus.index, consensus.text, consensus.rule)


def test_target_fit_takes_the_most_likely_candidate_by_mean_log_probability() -> None:
    scores = {
        0: scored(CANDIDATES[0], -1.0, -1.0, -1.0, -1.0),  # mean -1.0, total -4
        1: scored(CANDIDATES[1], -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5),  # -0.5, -4
        2: scored(CANDIDATES[2], -3.0),  # mean -3, total -3 (best total)
    }
    config = SelectionConfig(policy="target-fit", target="smol")
    got = choose(CANDIDATES, select(CANDIDATES), scores, config)
    assert got.index == 1 and got.rule == "target-fit" and got.text == CANDIDATES[1]
    assert got.scores == {0: -1.0, 1: -0.5, 2: -3.0}
    assert "'smol'" in got.why
    by_total = choose(
        CANDIDATES, select(CANDIDATES), scores, SelectionConfig("target-fit", "smol", "sum")
    )
    assert by_total.index == 2  # the total favours the short one


def test_target_fit_skips_failed_empty_and_unscored_candidates() -> None:
    candidates: list[str | None] = [None, "  ...  ", "An answer.", "Another answer."]
    scores = {1: scored("...", -0.01), 2: scored("An answer.", -2.0)}
    got = choose(candidates, select(["", "", ""]), scores, SelectionConfig("target-fit", "t"))
    assert got.index == 2  # 1 is empty after normalising, 3 has no score, 0 failed
    nothing = choose(candidates, select(["", "", ""]), {}, SelectionConfig("target-fit", "t"))
    assert not nothing.kept and nothing.rule == "no-scores"


def test_consensus_plus_target_fit_stays_discarded_when_consensus_discards() -> None:
    disagree = ["alpha beta", "gamma delta", "epsilon zeta"]
    consensus = select(disagree, threshold=0.01)
    assert not consensus.kept
    scores = {i: scored(t, -0.1) for i, t in enumerate(disagree)}
    got = choose(disagree, consensus, scores, SelectionConfig("consensus+target-fit", "t"))
    assert not got.kept and got.rule == consensus.rule


def test_consensus_plus_target_fit_only_considers_agreeing_candidates() -> None:
    candidates = [
        "the cat sat on the mat",
        "the cat sat on the mat",  # shortcut-first with 0
        "a completely unrelated sentence about rockets",
    ]
    consensus = select(candidates, threshold=0.3)
    assert consensus.rule == "shortcut-first" and consensus.index == 0
    scores = {0: scored(candidates[0], -2.0), 1: scored(candidates[1], -1.0)}
    scores[2] = scored(candidates[2], -0.01)  # most likely, but it disagrees
    config = SelectionConfig("consensus+target-fit", "t")
    got = choose(candidates, consensus, scores, config)
    assert got.eligible == (0, 1) and got.index == 1 and got.rule == "consensus+target-fit"
    plain_fit = choose(candidates, consensus, scores, SelectionConfig("target-fit", "t"))
    assert plain_fit.index == 2  # target fit alone would have kept the outlier


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="needs a target"):
        SelectionConfig(policy="target-fit")
    with pytest.raises(ValueError, match="policy"):
        SelectionConfig(policy="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalise"):
        SelectionConfig(policy="consensus", normalise="max")  # type: ignore[arg-type]


def test_fit_score_of_an_empty_completion_never_wins() -> None:
    assert fit_score(scored(""), "mean") == -math.inf
    assert fit_score(scored(""), "sum") == -math.inf


texts = st.lists(
    st.sampled_from(["a b c", "a b d", "x y z", "a b c d", "", "q"]), min_size=2, max_size=5
)


@given(candidates=texts, logprobs=st.lists(st.floats(-10, 0), min_size=5, max_size=5))
def test_combined_winner_agrees_with_consensus_and_is_the_best_such(
    candidates: list[str], logprobs: list[float]
) -> None:
    consensus = select(candidates, threshold=0.3)
    scores = {i: scored(t, logprobs[i]) for i, t in enumerate(candidates)}
    got = choose(candidates, consensus, scores, SelectionConfig("consensus+target-fit", "t"))
    assert got.kept == consensus.kept
    if got.index is None or consensus.index is None:
        return
    anchor = normalize(candidates[consensus.index])
    for i in got.eligible:
        if i != consensus.index:
            a, b = sorted((i, consensus.index))
            s = reference_similarity(normalize(candidates[a]), normalize(candidates[b]))
            assert s > 0.3 and anchor
    assert got.index in got.eligible
    assert all(got.scores[got.index] >= got.scores[i] for i in got.eligible)
