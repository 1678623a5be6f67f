"""Exact, fast ROUGE-L (F-measure) and a novelty filter built on it.

Everything here reproduces ``rouge_score`` bit for bit:

* tokens come from ``rouge_score``'s own tokenizer function (lowercase, every run of
  characters outside ``[a-z0-9]`` becomes a space, split, optional Porter stemming of
  tokens longer than 3 characters with the same NLTK stemmer class, drop invalid tokens);
  stems are memoised, which is safe because the stemmer is a pure function of the word;
* the longest common subsequence comes from rapidfuzz's bit-parallel ``LCSseq`` over
  sequences of integer token ids (encoded as code points of a ``str``), which is exact;
* the F-measure is evaluated with the same floating-point operations in the same order as
  ``rouge_score.scoring.fmeasure`` (``2 * p * r / (p + r)``), with
  ``p = lcs / len(prediction)`` and ``r = lcs / len(target)``.

``rouge_l(a, b)`` therefore equals
``RougeScorer(["rougeL"], use_stemmer=stem).score(a, b)["rougeL"].fmeasure`` (``a`` is the
target, ``b`` the prediction) exactly, not just to a tolerance.

:class:`NoveltyFilter` is the Self-Instruct / Ensemble-Instruct dedup step: a candidate is
kept when its highest ROUGE-L against every text in the pool is ``<= threshold``. It
tokenizes each pool text once, keeps an inverted index (token id -> pool entries with
their token counts) and prunes with an upper bound that cannot change a decision: the
LCS of two sequences is at most the size of their token multiset intersection ``m``, so
``F = 2 * lcs / (len_a + len_b) <= 2 * m / (len_a + len_b)``. Pool entries that share no
token score exactly 0 and are never looked at; the rest are visited in decreasing order of
their bound and the scan stops as soon as no remaining bound can beat the answer. The
bound is only used with a safety margin (``1e-9``) far above floating-point rounding, and
every score that decides anything is computed exactly.

The filter is not thread-safe; use it from one thread (or guard it with a lock).
"""

from __future__ import annotations

import array
import heapq
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as _rs_tokenize
from rouge_score import tokenizers as _rs_tokenizers

__all__ = [
    "NoveltyFilter",
    "fmeasure",
    "lcs_length",
    "rouge_l",
    "tokenize",
]

# Margin used with the upper bound: a pair is skipped only when its bound is below the
# value it would have to beat by more than this. Rounding error of the F-measure is
# ~1e-15, so this never changes a result.
_BOUND_EPS = 1e-9
# Candidates scored one at a time (cheap, allows early exit) before the rest of those
# still above the bound are scored in one vectorised call.
_SCALAR_BATCH = 32
_STEM_CACHE_MAX = 1 << 18

Seq = str | list[int]


class _CachedStemmer:
    """The stemmer rouge_score uses (NLTK's PorterStemmer), memoised per word."""

    def __init__(self) -> None:
        self._stemmer: Any = _rs_tokenizers.porter.PorterStemmer()
        self._cache: dict[str, str] = {}

    def stem(self, word: str) -> str:
        try:
            return self._cache[word]
        except KeyError:
            pass
        stemmed: str = self._stemmer.stem(word)
        if len(self._cache) >= _STEM_CACHE_MAX:
            self._cache.clear()
        self._cache[word] = stemmed
        return stemmed


_stemmer: _CachedStemmer | None = None


def _get_stemmer() -> _CachedStemmer:
    global _stemmer  # noqa: PLW0603 - one lazily built process-wide memo
    if _stemmer is None:
        _stemmer = _CachedStemmer()
    return _stemmer


def tokenize(text: str, *, stem: bool = False) -> list[str]:
    """The tokens rouge_score's default tokenizer gives for ``text``."""
    tokens: list[str] = _rs_tokenize.tokenize(text, _get_stemmer() if stem else None)
    return tokens


def fmeasure(lcs: int, len_target: int, len_prediction: int) -> float:
    """ROUGE-L F-measure from an LCS length, in rouge_score's floating-point order."""
    if len_target == 0 or len_prediction == 0:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _fmeasure_array(
    lcs: npt.NDArray[np.int64], len_target: int, len_predictions: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """Vectorised :func:`fmeasure` (IEEE operations in the same order, so same bits).

    ``len_target`` and every entry of ``len_predictions`` must be positive.
    """
    precision = lcs / len_predictions
    recall = lcs / float(len_target)
    numerator = 2.0 * precision * recall
    denominator = precision + recall
    out = np.zeros(lcs.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (exact)."""
    ids: dict[str, int] = {}
    sa = "".join(chr(ids.setdefault(t, len(ids))) for t in a)
    sb = "".join(chr(ids.setdefault(t, len(ids))) for t in b)
    if len(ids) > 0x10FFFF:  # pragma: no cover - more distinct tokens than code points
        la = [ids[t] for t in a]
        lb = [ids[t] for t in b]
        return int(LCSseq.similarity(la, lb))
    return int(LCSseq.similarity(sa, sb))


def rouge_l(a: str, b: str, *, stem: bool = False) -> float:
    """ROUGE-L F-measure of ``a`` (target) and ``b`` (prediction), as rouge_score computes it.

    Equal to ``RougeScorer(["rougeL"], use_stemmer=stem).score(a, b)["rougeL"].fmeasure``.
    """
    ta = tokenize(a, stem=stem)
    tb = tokenize(b, stem=stem)
    if not ta or not tb:
        return 0.0
    return fmeasure(lcs_length(ta, tb), len(ta), len(tb))


class _Query:
    """A text to score against the pool, tokenized and encoded once."""

    __slots__ = ("counts", "length", "seq")

    def __init__(self, seq: Seq, length: int, counts: dict[int, int]) -> None:
        self.seq = seq
        self.length = length
        self.counts = counts  # token id -> count, only ids known to the pool


class NoveltyFilter:
    """Keep texts whose ROUGE-L against everything kept so far is ``<= threshold``.

    ``pool`` seeds the pool unconditionally (Self-Instruct's seed instructions). The score of
    a candidate ``text`` against a pool entry ``p`` is ``rouge_l(text, p, stem=stem)``
    (candidate as target, pool entry as prediction, as Self-Instruct scores it).

    ``prune=False`` scores every pair without the index or the bound (a brute-force
    reference that gives the same results, used by the tests and the benchmark).
    """

    # Largest token id that still fits in a code point; beyond it sequences fall back to
    # lists of ints (slower, same results). A class attribute so tests can lower it.
    _max_code: int = 0x10FFFF

    def __init__(
        self,
        pool: Iterable[str] = (),
        *,
        threshold: float = 0.7,
        stem: bool = False,
        prune: bool = True,
    ) -> None:
        self.threshold = threshold
        self.stem = stem
        self.prune = prune
        self._texts: list[str] = []
        self._seqs: list[Seq] = []
        self._lens: list[int] = []
        self._lens_buf: npt.NDArray[np.int64] = np.zeros(64, dtype=np.int64)
        # id 0 is reserved for query tokens the pool has never seen: it matches nothing.
        self._vocab: dict[str, int] = {}
        self._as_text = True
        self._post_idx: dict[int, array.array[int]] = {}
        self._post_cnt: dict[int, array.array[int]] = {}
        for text in pool:
            self.add(text)

    # -- pool -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._texts)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._texts))

    @property
    def texts(self) -> tuple[str, ...]:
        """The pool, in insertion order."""
        return tuple(self._texts)

    def add(self, text: str) -> None:
        """Add ``text`` to the pool unconditionally."""
        tokens = tokenize(text, stem=self.stem)
        ids: list[int] = []
        vocab = self._vocab
        for token in tokens:
            tid = vocab.get(token)
            if tid is None:
                tid = len(vocab) + 1
                vocab[token] = tid
            ids.append(tid)
        if self._as_text and len(vocab) > self._max_code:
            self._switch_to_lists()
        entry = len(self._texts)
        self._texts.append(text)
        self._seqs.append(self._encode(ids))
        self._lens.append(len(ids))
        if entry == len(self._lens_buf):
            self._lens_buf = np.concatenate([self._lens_buf, np.zeros_like(self._lens_buf)])
        self._lens_buf[entry] = len(ids)
        for tid, count in Counter(ids).items():
            postings = self._post_idx.get(tid)
            if postings is None:
                self._post_idx[tid] = array.array("i", (entry,))
                self._post_cnt[tid] = array.array("i", (count,))
            else:
                postings.append(entry)
                self._post_cnt[tid].append(count)

    def _switch_to_lists(self) -> None:
        self._as_text = False
        self._seqs = [s if isinstance(s, list) else [ord(c) for c in s] for s in self._seqs]

    @property
    def _lens_np(self) -> npt.NDArray[np.int64]:
        return self._lens_buf[: len(self._lens)]

    def _encode(self, ids: list[int]) -> Seq:
        if self._as_text:
            return "".join(map(chr, ids))
        return ids

    def _query(self, text: str) -> _Query:
        vocab = self._vocab
        ids = [vocab.get(token, 0) for token in tokenize(text, stem=self.stem)]
        counts = Counter(ids)
        counts.pop(0, None)
        return _Query(self._encode(ids), len(ids), dict(counts))

    # -- scoring --------------------------------------------------------------------------

    def _score(self, query: _Query, entry: int) -> float:
        lcs = int(LCSseq.similarity(query.seq, self._seqs[entry]))
        return fmeasure(lcs, query.length, self._lens[entry])

    def _score_many(self, query: _Query, entries: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
        """Exact scores of ``query`` against pool ``entries`` (all non-empty) in one call."""
        seqs = self._seqs
        choices = [seqs[i] for i in entries.tolist()]
        lcs = process.cdist([query.seq], choices, scorer=LCSseq.similarity, dtype=np.int64)[0]
        return _fmeasure_array(lcs, query.length, self._lens_np[entries])

    def _bounded(self, query: _Query) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        """Entries sharing a token with ``query`` and their upper bounds ``2m/(la+lb)``."""
        n = len(self._texts)
        # Views of the postings live only inside this call, so the arrays can still grow.
        singles: list[npt.NDArray[np.int32]] = []
        multi: list[tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]] = []
        for tid, q_count in query.counts.items():
            idx = np.frombuffer(self._post_idx[tid], dtype=np.int32)
            if q_count == 1:
                singles.append(idx)
            else:
                counts = np.frombuffer(self._post_cnt[tid], dtype=np.int32)
                multi.append((idx, np.minimum(counts, q_count)))
        if singles:
            shared = np.bincount(np.concatenate(singles), minlength=n)
        else:
            shared = np.zeros(n, dtype=np.int64)
        for idx, weight in multi:
            shared += np.bincount(idx, weights=weight, minlength=n).astype(np.int64)
        entries = np.flatnonzero(shared)
        bounds = 2.0 * shared[entries] / (query.length + self._lens_np[entries])
        return entries, bounds

    def _brute_scores(self, query: _Query) -> list[float]:
        return [self._score(query, entry) for entry in range(len(self._texts))]

    def max_similarity(self, text: str) -> float:
        """Highest ROUGE-L of ``text`` against the pool (0.0 for an empty pool)."""
        query = self._query(text)
        if query.length == 0 or not self._texts:
            return 0.0
        if not self.prune:
            return max(self._brute_scores(query))
        return self._max_pruned(query, stop_above=None)

    def _max_pruned(self, query: _Query, stop_above: float | None) -> float:
        """Exact max score; with ``stop_above``, stop at the first score above it.

        With ``stop_above`` the result is exact only in how it compares with
        ``stop_above`` (which is all that a threshold decision needs).
        """
        entries, bounds = self._bounded(query)
        if len(entries) == 0:
            return 0.0
        best = 0.0
        if stop_above is None:
            # Score the entry with the best bound first: its score is a floor for the max.
            first = int(np.argmax(bounds))
            best = self._score(query, int(entries[first]))
            floor = best
        else:
            floor = stop_above
        keep = bounds >= floor - _BOUND_EPS
        entries, bounds = entries[keep], bounds[keep]
        order = np.argsort(-bounds, kind="stable")
        entries, bounds = entries[order], bounds[order]
        n = len(entries)
        head = min(n, _SCALAR_BATCH)
        for k in range(head):
            if bounds[k] < max(best, floor) - _BOUND_EPS:
                return best
            score = self._score(query, int(entries[k]))
            if score > best:
                best = score
                if stop_above is not None and best > stop_above:
                    return best
        if head == n:
            return best
        rest = entries[head:][bounds[head:] >= max(best, floor) - _BOUND_EPS]
        if len(rest) == 0:
            return best
        return max(best, float(self._score_many(query, rest).max()))

    def similarities(self, text: str) -> list[float]:
        """Exact ROUGE-L of ``text`` against every pool entry, in pool order."""
        query = self._query(text)
        scores = np.zeros(len(self._texts), dtype=np.float64)
        if query.length == 0 or not self._texts:
            return [float(s) for s in scores]
        if not self.prune:
            return self._brute_scores(query)
        entries, _ = self._bounded(query)
        if len(entries):
            scores[entries] = self._score_many(query, entries)
        return [float(s) for s in scores]

    def top_similar(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` pool entries most similar to ``text``, best first, ties by pool order.

        Entries with score 0 fill the list (in pool order) when fewer than ``k`` score more,
        as the reference's ``most_similar`` field does.
        """
        if k <= 0:
            return []
        scores = self.similarities(text)
        best = heapq.nsmallest(k, range(len(scores)), key=lambda i: (-scores[i], i))
        return [(self._texts[i], scores[i]) for i in best]

    def is_novel(self, text: str) -> bool:
        """Whether ``text`` would be accepted (max similarity ``<= threshold``); no change."""
        query = self._query(text)
        if query.length == 0 or not self._texts:
            return True
        if not self.prune:
            return all(s <= self.threshold for s in self._brute_scores(query))
        return self._max_pruned(query, stop_above=self.threshold) <= self.threshold

    def offer(self, text: str) -> bool:
        """Add ``text`` when it is novel (max similarity ``<= threshold``); say whether it was."""
        if self.is_novel(text):
            self.add(text)
            return True
        return False
