"""Which candidate a decision keeps: consensus, target fit, or both.

Three policies sit on top of the consensus rule (:mod:`ensemble_async.consensus`) and of
log-likelihood scores under a *target* model (:mod:`ensemble_async.scoring`):

``consensus``
    Today's rule, unchanged: the candidates' medoid by ROUGE-L, or a shortcut when two
    agree exactly (Ensemble-Instruct).
``target-fit``
    The candidate the model to be fine-tuned finds most likely (GRAPE: gather answers
    from several LMs, keep the one with the highest probability under the target, then
    fine-tune on those).  Scores are length-normalised by default (mean log-probability
    per token), so a short answer does not win only by being short.  Empty candidates and
    candidates without a score never win; with no scored candidate the item is
    discarded (rule ``no-scores``).
``consensus+target-fit``
    Consensus first: an item the consensus discards stays discarded.  Otherwise, among the
    candidates that agree with the consensus winner above the threshold (the winner and
    every non-empty candidate whose similarity with it is ``> threshold``), the target
    model's favourite wins.

:func:`choose` is pure: the caller gathers the scores (through the target member, so
scoring requests get the same admission, retries, cache and breaker as generation) and
passes them in.  The result says which candidate won and why, with every score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .consensus import Selection, Similarity, normalize, reference_similarity
from .scoring import CompletionScore

__all__ = [
    "NORMALISATIONS",
    "POLICIES",
    "FitChoice",
    "Normalisation",
    "SelectionConfig",
    "SelectionPolicy",
    "choose",
    "fit_score",
]

SelectionPolicy = Literal["consensus", "target-fit", "consensus+target-fit"]
Normalisation = Literal["mean", "sum"]
POLICIES: tuple[str, ...] = get_args(SelectionPolicy)
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)


@dataclass(frozen=True)
class SelectionConfig:
    """``policy``; ``target``: the member (backend name) that scores, required by the
    target-fit policies; ``normalise``: ``mean`` (per-token mean log-probability, the
    default) or ``sum`` (total log-probability)."""

    policy: SelectionPolicy = "consensus"
    target: str | None = None
    normalise: Normalisation = "mean"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"selection policy must be one of {POLICIES}, got {self.policy!r}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")
        if self.needs_scores and not self.target:
            raise ValueError(f"selection policy {self.policy!r} needs a target model")

    @property
    def needs_scores(self) -> bool:
        return self.policy != "consensus"

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "target": self.target, "normalise": self.normalise}


@dataclass(frozen=True)
class FitChoice:
    """The kept candidate (``index``/``text``, ``None`` when discarded), the ``rule`` that
    decided, the candidates that were ``eligible``, every candidate's normalised score
    (``scores``), the consensus pick it started from, and a sentence saying why."""

    index: int | None
    text: str | None
    rule: str
    policy: str
    eligible: tuple[int, ...] = ()
    scores: dict[int, float] = field(default_factory=dict)
    consensus_index: int | None = None
    why: str = ""

    @property
    def kept(self) -> bool:
        return self.index is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "index": self.index,
            "kept": self.kept,
            "rule": self.rule,
            "eligible": list(self.eligible),
            "scores": [[i, s] for i, s in sorted(self.scores.items())],
            "consensus_index": self.consensus_index,
            "why": self.why,
        }


def fit_score(score: CompletionScore, normalise: Normalisation) -> float:
    """The number target fit compares: mean or total log-probability (-inf if no tokens)."""
    if not score.token_logprobs:
        return -math.inf
    return score.mean if normalise == "mean" else score.total


def _best(eligible: Sequence[int], scores: Mapping[int, float]) -> int | None:
    """The highest-scoring eligible candidate; ties go to the lowest index."""
    ranked = [i for i in eligible if i in scores and math.isfinite(scores[i])]
    if not ranked:
        return None
    return max(ranked, key=lambda i: (scores[i], -i))


def choose(
    candidates: Sequence[str | None],
    consensus: Selection,
    scores: Mapping[int, CompletionScore],
    config: SelectionConfig,
    *,
    similarity: Similarity | None = None,
) -> FitChoice:
    """Apply ``config.policy`` (see the module docstring).

    ``candidates[i]`` is candidate ``i``'s text (``None`` when it failed); ``consensus`` is
    the consensus decision over them; ``scores[i]`` is candidate ``i``'s score under the
    target model (missing for failed or unscored candidates).
    """
    normalised = {i: fit_score(s, config.normalise) for i, s in scores.items()}
    usable = [i for i, text in enumerate(candidates) if text is not None and normalize(text)]

    def made(
        index: int | None, text: str | None, rule: str, eligible: Sequence[int], why: str
    ) -> FitChoice:
        return FitChoice(
            index, text, rule, config.policy, tuple(eligible), normalised, consensus.index, why
        )

    if config.policy == "consensus":
        return made(
            consensus.index,
            consensus.text,
            consensus.rule,
            tuple(usable),
            f"consensus rule {consensus.rule!r}",
        )

    if config.policy == "target-fit":
        winner = _best(usable, normalised)
        if winner is None:
            return made(
                None,
                None,
                "no-scores",
                tuple(usable),
                "no candidate has a score under the target model",
            )
        text = candidates[winner]
        assert text is not None
        return made(
            winner,
            text.strip(),
            "target-fit",
            tuple(usable),
            (
                f"highest {config.normalise} log-probability under {config.target!r} "
                f"({normalised[winner]:.4f}) of {len(usable)} candidates"
            ),
        )

    # consensus+target-fit
    if consensus.index is None:
        return made(
            None, None, consensus.rule, (), f"the consensus discarded the item ({consensus.rule!r})"
        )
    similar = similarity or reference_similarity
    anchor = candidates[consensus.index]
    assert anchor is not None
    anchor_norm = normalize(anchor)
    agree: list[int] = []
    for i in usable:
        if i == consensus.index:
            agree.append(i)
            continue
        text = candidates[i]
        assert text is not None
        key = (min(i, consensus.index), max(i, consensus.index))
        known = consensus.pairwise.get(key)
        s = known if known is not None else similar(*_ordered(i, consensus.index, candidates))
        if s > consensus.threshold:
            agree.append(i)
    winner = _best(agree, normalised)
    if winner is None:  # nobody scored: the consensus pick stands
        return made(
            consensus.index,
            consensus.text,
            consensus.rule,
            tuple(agree),
            "no agreeing candidate has a score; the consensus pick stands",
        )
    text = candidates[winner]
    assert text is not None and anchor_norm
    return made(
        winner,
        text.strip(),
        "consensus+target-fit",
        tuple(agree),
        (
            f"of the {len(agree)} candidates agreeing with the consensus pick "
            f"#{consensus.index} above {consensus.threshold}, the most likely under "
            f"{config.target!r} ({config.normalise} {normalised[winner]:.4f})"
        ),
    )


def _ordered(i: int, j: int, candidates: Sequence[str | None]) -> tuple[str, str]:
    """The normalised pair in index order, as the consensus rule compares them."""
    a, b = (i, j) if i < j else (j, i)
    x, y = candidates[a], candidates[b]
    assert x is not None and y is not None
    return normalize(x), normalize(y)
