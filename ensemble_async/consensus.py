"""Consensus over the ensemble's outputs (Ensemble-Instruct step 5).

:func:`select` is the batch rule, exactly as SPEC.md describes it (the reference's
three-way rule, generalised to any number of candidates):

1. Normalise every candidate: lowercase, delete ASCII punctuation (``string.punctuation``),
   collapse white space.
2. Shortcuts: the lowest index ``i`` whose normalised text equals that of some later
   candidate wins. When ``i`` is the first candidate this is the ``"shortcut-first"`` rule
   (candidate 0 equals any other); otherwise ``"shortcut-pair"``.
3. Otherwise the medoid: ``s_ij = similarity(norm_i, norm_j)`` for every pair ``i < j``
   (by default ROUGE-L F-measure with Porter stemming, called the way the reference calls
   rouge_score: ``norm_i`` as prediction, ``norm_j`` as target). Candidate ``i`` scores
   ``score_i = sum_j w_j * s_ij`` over the other candidates ``j`` in index order (``w_j``
   is 1 without ``weights``, so a trusted model's agreement counts more with weights); the
   highest score wins, ties to the lowest index. It is kept only when the lowest pairwise
   score is ``> threshold`` (tau, 0.01).
4. The kept text is the winner's original text, stripped.

"Empty" means that nothing is left after normalising (an empty or punctuation-only
output). An empty candidate never wins: it takes no part in the shortcut equalities (two
empty outputs do not agree on anything, and a shortcut on them would hide a real
agreement between later candidates), and an empty medoid winner is discarded (rule
``"empty"``). On the 153 reference cases this gives the reference decisions; it differs
from the reference code only where that code keeps an empty output.

One candidate is kept when it is not empty (``"single"``); no candidates: ``"none"``.

:class:`IncrementalSelector` makes the same decision while candidates arrive one by one,
and says as soon as the outcome can no longer change (``policy="exact"``), or decides
earlier by agreement (``"quorum"``) or when told to (``"deadline"``).  With
``min_candidates`` set, a decision needs that many candidates that arrived or failed for
their own reason: fewer is rule ``"too-few-candidates"`` (nothing kept), decided as soon
as unavailable ones make the number unreachable.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .rouge import fmeasure, lcs_length, rouge_l, tokenize

__all__ = [
    "RULES",
    "Decision",
    "IncrementalSelector",
    "Policy",
    "Selection",
    "normalize",
    "reference_similarity",
    "select",
]

Similarity = Callable[[str, str], float]
Policy = Literal["exact", "quorum", "deadline"]

RULES = (
    "shortcut-first",
    "shortcut-pair",
    "medoid",
    "below-threshold",
    "single",
    "empty",
    "none",
    "quorum",
    "too-few-candidates",
)

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, delete ASCII punctuation, collapse white space (the reference's order)."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def reference_similarity(prediction: str, target: str) -> float:
    """ROUGE-L F with stemming, as the reference scores a pair (``i`` prediction, ``j`` target)."""
    return rouge_l(target, prediction, stem=True)


@dataclass(frozen=True)
class Selection:
    """The outcome of a consensus decision, with everything needed for provenance.

    ``index``/``text``: the kept candidate and its stripped original text (``None`` when
    discarded). ``indices``: the candidates considered (all of them for :func:`select`).
    ``pairwise``: ``{(i, j): s_ij}`` for ``i < j`` (empty when a shortcut decided).
    ``scores``: ``{i: score_i}``, the medoid sums. ``best``: the medoid winner before the
    threshold and empty checks. ``min_pairwise``: the lowest pairwise score.
    """

    index: int | None
    text: str | None
    rule: str
    indices: tuple[int, ...] = ()
    pairwise: dict[tuple[int, int], float] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    best: int | None = None
    min_pairwise: float | None = None
    threshold: float = 0.01

    @property
    def kept(self) -> bool:
        return self.index is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the decision."""
        return {
            "index": self.index,
            "kept": self.kept,
            "rule": self.rule,
            "indices": list(self.indices),
            "pairwise": [[i, j, s] for (i, j), s in sorted(self.pairwise.items())],
            "scores": [[i, s] for i, s in sorted(self.scores.items())],
            "best": self.best,
            "min_pairwise": self.min_pairwise,
            "threshold": self.threshold,
        }


def _check_weights(weights: Sequence[float] | None, n: int) -> None:
    if weights is None:
        return
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} candidates")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights must be finite and >= 0, got {w!r}")


class _Pairs:
    """Each candidate's normalised text, and each pair's similarity, computed once.

    With the default similarity (:func:`reference_similarity`) a candidate is also
    tokenised (and stemmed) once, not once per pair: ``s_ij`` is then computed from the
    two token lists, with the same operations as ``rouge_l``, so the value is the same.
    ``scores`` maps ``(i, j)``, ``i < j``, to ``s_ij``.
    """

    __slots__ = ("_similarity", "_tokens", "norms", "scores")

    def __init__(self, similarity: Similarity) -> None:
        self._similarity = similarity
        self._tokens: dict[int, list[str]] = {}
        self.norms: dict[int, str] = {}
        self.scores: dict[tuple[int, int], float] = {}

    def norm(self, index: int, text: str) -> str:
        norm = self.norms.get(index)
        if norm is None:
            norm = self.norms[index] = normalize(text)
        return norm

    def _tokens_of(self, index: int) -> list[str]:
        tokens = self._tokens.get(index)
        if tokens is None:
            tokens = self._tokens[index] = tokenize(self.norms[index], stem=True)
        return tokens

    def score(self, a: int, b: int) -> float:
        """``s_ab`` for ``a < b`` (``norm_a`` the prediction, ``norm_b`` the target);
        both norms must be known."""
        key = (a, b)
        score = self.scores.get(key)
        if score is None:
            if self._similarity is reference_similarity:
                prediction, target = self._tokens_of(a), self._tokens_of(b)
                score = (
                    fmeasure(lcs_length(target, prediction), len(target), len(prediction))
                    if prediction and target
                    else 0.0
                )
            else:
                score = self._similarity(self.norms[a], self.norms[b])
            self.scores[key] = score
        return score


def _decide(
    items: Sequence[tuple[int, str]],
    *,
    threshold: float,
    pairs: _Pairs,
    weights: Sequence[float] | None,
) -> Selection:
    """The batch rule over ``(original index, text)`` pairs in increasing index order."""
    indices = tuple(i for i, _ in items)
    if not items:
        return Selection(None, None, "none", indices, threshold=threshold)
    norms = [pairs.norm(i, text) for i, text in items]
    if len(items) == 1:
        index, text = items[0]
        if norms[0]:
            return Selection(index, text.strip(), "single", indices, threshold=threshold)
        return Selection(None, None, "empty", indices, threshold=threshold)

    seen: dict[str, int] = {}
    for norm in norms:
        if norm:
            seen[norm] = seen.get(norm, 0) + 1
    for pos, norm in enumerate(norms):
        if norm and seen[norm] > 1:
            index, text = items[pos]
            rule = "shortcut-first" if pos == 0 else "shortcut-pair"
            return Selection(index, text.strip(), rule, indices, threshold=threshold)

    pairwise: dict[tuple[int, int], float] = {}
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            pairwise[(items[a][0], items[b][0])] = pairs.score(items[a][0], items[b][0])
    scores: dict[int, float] = {}
    best_pos = 0
    for a in range(len(items)):
        total = 0.0
        for b in range(len(items)):
            if a == b:
                continue
            s = pairwise[(items[min(a, b)][0], items[max(a, b)][0])]
            total += s if weights is None else weights[items[b][0]] * s
        scores[items[a][0]] = total
        if total > scores[items[best_pos][0]]:
            best_pos = a
    best = items[best_pos][0]
    # A pair that could not be scored (NaN) ranks lowest, so it can never pass the threshold.
    low = min(pairwise.values(), key=lambda s: (not math.isnan(s), s))
    common: dict[str, Any] = {
        "indices": indices,
        "pairwise": pairwise,
        "scores": scores,
        "best": best,
        "min_pairwise": low,
        "threshold": threshold,
    }
    if not low > threshold:
        return Selection(None, None, "below-threshold", **common)
    if not norms[best_pos]:
        return Selection(None, None, "empty", **common)
    return Selection(best, items[best_pos][1].strip(), "medoid", **common)


def select(
    candidates: Sequence[str],
    *,
    threshold: float = 0.01,
    similarity: Similarity | None = None,
    weights: Sequence[float] | None = None,
) -> Selection:
    """Pick the consensus output among ``candidates`` (order = priority); see the module doc.

    ``similarity(x, y)`` is called once per pair ``i < j`` with the normalised texts
    ``x = norm_i``, ``y = norm_j``; the default is :func:`reference_similarity`.
    ``weights[j]`` multiplies every pairwise score that candidate ``j`` contributes to
    another candidate's medoid sum (``score_i = sum_j w_j * s_ij``).
    """
    _check_weights(weights, len(candidates))
    return _decide(
        list(enumerate(candidates)),
        threshold=threshold,
        pairs=_Pairs(similarity or reference_similarity),
        weights=weights,
    )


@dataclass(frozen=True)
class Decision:
    """A decision of :class:`IncrementalSelector`.

    ``arrived``: the candidates that had arrived when it was made; ``early``: made before
    every expected candidate had arrived or failed. An early ``"exact"`` decision carries
    the scores known at that time.
    """

    selection: Selection
    policy: str
    arrived: tuple[int, ...]
    early: bool

    @property
    def index(self) -> int | None:
        return self.selection.index

    @property
    def text(self) -> str | None:
        return self.selection.text

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.selection.to_dict(),
            "policy": self.policy,
            "arrived": list(self.arrived),
            "early": self.early,
        }


class IncrementalSelector:
    """The consensus decision for candidates that arrive one at a time, in any order.

    Candidates are identified by their priority index ``0 .. n_expected - 1``; report each
    with :meth:`add`, or :meth:`fail` when it will never come (its backend gave up).

    * ``"exact"``: :meth:`add` returns the decision as soon as no candidate still to come
      can change it, and that decision is always the one :func:`select` makes on every
      candidate that arrives (failed ones left out). For instance, once candidate 0 and
      an equal candidate have arrived, rule 1 fires whatever the others say.
    * ``"quorum"``: decides as soon as some non-empty candidate is backed by ``quorum - 1``
      other non-empty ones with similarity ``>= agreement`` (normalised equality counts
      as 1.0); among such candidates the one with the highest (weighted) similarity sum
      to the arrived ones wins, ties to the lowest index. Faster, not always what :func:`select` picks.
    * ``"deadline"``: decides only when everything has arrived or :meth:`finalize` is
      called, with what has arrived.

    :meth:`finalize` decides now, for any policy, with the arrived candidates. Once made, a
    decision never changes: later :meth:`add` calls return it again.

    ``min_candidates`` (default: no minimum): how many candidates must have *answered*:
    arrived, or failed for their own reason (``fail(i, unavailable=False)``: a bad
    request, a context too long; such an answer is final).  Fewer give rule
    ``"too-few-candidates"`` and keep nothing, whatever the arrived ones say.  No policy
    decides early on fewer, so ``"exact"`` still decides exactly what waiting for
    everyone gives; once unavailable candidates leave too few possible, that rule is
    decided at once.

    ``finalize_complete=True``: the decision on a complete set of candidates is left to
    :meth:`finalize` (not made inside :meth:`add`/:meth:`fail`), so the caller may run it
    elsewhere, e.g. on a copy in another process: a selector pickles with its state.
    """

    def __init__(
        self,
        n_expected: int,
        *,
        policy: Policy = "exact",
        threshold: float = 0.01,
        similarity: Similarity | None = None,
        weights: Sequence[float] | None = None,
        quorum: int = 2,
        agreement: float = 1.0,
        min_candidates: int | None = None,
        finalize_complete: bool = False,
    ) -> None:
        if n_expected < 0:
            raise ValueError("n_expected must be >= 0")
        if min_candidates is not None and not 1 <= min_candidates <= max(1, n_expected):
            raise ValueError(
                f"min_candidates must be in 1..{max(1, n_expected)}, got {min_candidates}"
            )
        if policy not in ("exact", "quorum", "deadline"):
            raise ValueError(f"unknown policy {policy!r}")
        if quorum < 2:
            raise ValueError("quorum must be >= 2")
        _check_weights(weights, n_expected)
        self.n_expected = n_expected
        self.policy: Policy = policy
        self.threshold = threshold
        self.similarity: Similarity = similarity or reference_similarity
        self.weights = weights
        self.quorum = quorum
        self.agreement = agreement
        self.min_candidates = min_candidates
        self.finalize_complete = finalize_complete
        self._texts: dict[int, str] = {}
        self._pairs = _Pairs(self.similarity)
        self._norms = self._pairs.norms
        self._failed: set[int] = set()
        self._answered_failures: set[int] = set()
        self._decision: Decision | None = None

    @property
    def decision(self) -> Decision | None:
        return self._decision

    @property
    def done(self) -> bool:
        return self._decision is not None

    @property
    def arrived(self) -> Mapping[int, str]:
        return dict(self._texts)

    @property
    def missing(self) -> list[int]:
        """Candidates neither arrived nor failed."""
        return [i for i in range(self.n_expected) if i not in self._texts and i not in self._failed]

    def _check_new(self, index: int) -> None:
        if not 0 <= index < self.n_expected:
            raise IndexError(f"candidate index {index} out of range 0..{self.n_expected - 1}")
        if index in self._texts or index in self._failed:
            raise ValueError(f"candidate {index} was already reported")

    def add(self, index: int, text: str) -> Decision | None:
        """Record candidate ``index``; return the decision once it is final, else ``None``."""
        self._check_new(index)
        self._texts[index] = text
        self._pairs.norm(index, text)
        if self._decision is not None:
            return self._decision
        return self._update()

    def fail(self, index: int, *, unavailable: bool = True) -> Decision | None:
        """Record that candidate ``index`` will never arrive: its source was unavailable
        (default), or it failed for its own reason (``unavailable=False``), which counts
        as an answer towards ``min_candidates``."""
        self._check_new(index)
        self._failed.add(index)
        if not unavailable:
            self._answered_failures.add(index)
        if self._decision is not None:
            return self._decision
        return self._update()

    def finalize(self) -> Decision:
        """Decide now with the candidates that have arrived (or return the decision made)."""
        if self._decision is None:
            self._decision = self._batch(early=bool(self.missing))
        return self._decision

    # -- internals ------------------------------------------------------------------------

    def _items(self) -> list[tuple[int, str]]:
        return sorted(self._texts.items())

    def _answered(self) -> int:
        return len(self._texts) + len(self._answered_failures)

    def _batch(self, *, early: bool) -> Decision:
        if self.min_candidates is not None and self._answered() < self.min_candidates:
            selection = Selection(
                None,
                None,
                "too-few-candidates",
                tuple(sorted(self._texts)),
                threshold=self.threshold,
            )
            return Decision(selection, self.policy, tuple(sorted(self._texts)), early)
        selection = _decide(
            self._items(), threshold=self.threshold, pairs=self._pairs, weights=self.weights
        )
        return Decision(selection, self.policy, tuple(sorted(self._texts)), early)

    def _pair(self, i: int, j: int) -> float:
        return self._pairs.score(i, j) if i < j else self._pairs.score(j, i)

    def _update(self) -> Decision | None:
        missing = self.missing
        if not missing:
            if not self.finalize_complete:
                self._decision = self._batch(early=False)
        elif self.min_candidates is not None and self._answered() < self.min_candidates:
            if self._answered() + len(missing) < self.min_candidates:
                self._decision = self._batch(early=True)  # too few can still come
        elif self.policy == "exact":
            self._decision = self._exact_early()
        elif self.policy == "quorum":
            self._decision = self._quorum()
        return self._decision

    def _exact_early(self) -> Decision | None:
        """The batch decision if no candidate still to come can change it, else None."""
        missing = set(self.missing)
        live = [i for i in range(self.n_expected) if i not in self._failed]
        norms = self._norms
        # Shortcut: the lowest live index equal to a later one. Walk up: the first index
        # that certainly wins decides; one that only might win blocks any early decision.
        for pos, i in enumerate(live):
            later = live[pos + 1 :]
            if i in missing:
                # It may turn out equal to any later candidate that is missing or not empty.
                if any(j in missing or norms[j] for j in later):
                    return None
                continue
            if not norms[i]:
                continue
            if any(j not in missing and norms[j] == norms[i] for j in later):
                return self._batch(early=True)
            if any(j in missing for j in later):
                return None
        # No shortcut can fire any more: the medoid needs everyone, unless an arrived pair
        # already scores <= threshold, which discards whatever comes.
        arrived = sorted(self._texts)
        for a_pos, a in enumerate(arrived):
            for b in arrived[a_pos + 1 :]:
                if not self._pair(a, b) > self.threshold:
                    return self._batch(early=True)
        return None

    def _quorum(self) -> Decision | None:
        arrived = sorted(self._texts)
        weights = self.weights
        best: tuple[float, int] | None = None
        for i in arrived:
            if not self._norms[i]:
                continue
            backers = 0
            support = 0.0
            for j in arrived:
                if j == i:
                    continue
                s = 1.0 if self._norms[i] == self._norms[j] else self._pair(i, j)
                support += s if weights is None else weights[j] * s
                if s >= self.agreement and self._norms[j]:  # an empty one agrees with nothing
                    backers += 1
            if backers + 1 >= self.quorum and (best is None or support > best[0]):
                best = (support, i)
        if best is None:
            return None
        index = best[1]
        pairwise = {
            (a, b): s
            for (a, b), s in self._pairs.scores.items()
            if a in self._texts and b in self._texts
        }
        selection = Selection(
            index,
            self._texts[index].strip(),
            "quorum",
            tuple(arrived),
            pairwise=pairwise,
            best=index,
            threshold=self.threshold,
        )
        return Decision(selection, self.policy, tuple(arrived), early=True)
