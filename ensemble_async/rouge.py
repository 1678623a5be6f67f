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
kept when its highest ROUGE-L against every text in the pool is ``<= threshold``. Deciding
that must not touch most of the pool, or the filter slows down as the pool grows; it uses
prefix filtering, the technique of exact set-similarity joins.

*The bound.* A text of ``n`` tokens is the set of items ``(token, k)`` for the ``k``-th
occurrence of each token, so the token-multiset overlap ``o`` of two texts is a set
intersection, and ``lcs <= o <= min(la, lb)``. rouge_score's ``2pr/(p+r)`` with
``p = lcs/lb`` and ``r = lcs/la`` is ``2 * lcs / (la + lb)`` up to a few ulps, so a pair can
score above ``t`` only when ``o >= t' * (la + lb) / 2`` with ``t' = t - 1e-9`` (a margin far
above rounding). As ``o <= lb`` this forces ``lb >= la * t' / (2 - t')`` (and symmetrically
``lb <= la * (2 - t') / t'``: the length filter), and then ``o >= o_min(la) =
ceil(la * t' / (2 - t'))``. Sort every text's items in one fixed global order; if two texts
share ``o >= o_min`` items, the smallest shared item lies within the first
``n - o_min(n) + 1`` items of *each* (each text has at most ``n - o_min`` unshared items).
So the pool indexes only those prefix items, a query probes only its own prefix, and a
pool entry that shares no prefix item cannot exceed ``t``.

*The order.* Correctness needs only one fixed total order at any moment (every indexed
prefix and every query use it); rarity first only makes it fast. Tokens are ranked by
their frequency in the pool, rarest first, when the pool reaches 1,024, 4,096, 16,384 and
65,536 texts (the prefix index is rebuilt each time: amortised O(1) per text), and the
ranking is then frozen: by then the frequent words, the ones that matter, are well
estimated. A token first seen after the last ranking sorts before every ranked one
(newest first), which leaves the order of everything indexed unchanged; if the text drifts
so that such a token becomes frequent, the filter gets slower, never wrong. Tokens of a
query that the pool has never seen match nothing and are left out of its prefix.

*Two prefixes.* A pair also needs ``o >= t' * min(la, lb)`` (as ``la + lb >= 2 * min``), so
the shorter text of a pair may use a shorter prefix: ``n - ceil(t' * n) + 1`` items. Each
entry is indexed twice: under its long prefix (``o_min`` as above, for partners no longer
than itself) and under its short prefix (for longer partners). A query probes the long
prefixes of entries at least as long as itself with its own short prefix, and the short
prefixes of shorter entries with its long prefix, so the frequent items near the end of
long prefixes meet each other far less often.

*Filters before the exact score.* The length filter, then the positional filter (a pair's
shared items all lie at or after its first shared item in both texts, so the remaining
items on each side must still hold the overlap the pair needs), then a 64-bucket sketch
of each text's token counts (the sum of per-bucket minima bounds the multiset overlap).
Survivors are scored exactly with the bit-parallel LCS, and a decision is only ever taken
on an exact score.

:meth:`NoveltyFilter.max_similarity`, :meth:`~NoveltyFilter.similarities` and
:meth:`~NoveltyFilter.top_similar` need scores below the threshold too; they use a second,
full inverted index (token id -> pool entries with their counts), built on first use, and
prune with the weaker bound ``F <= 2 * o / (la + lb)``: entries that share no token score
exactly 0 and are never looked at, the rest are visited in decreasing order of their bound
and the scan stops as soon as no remaining bound can beat the answer. Their cost grows
with the pool; :meth:`~NoveltyFilter.offer` and :meth:`~NoveltyFilter.is_novel` do not use
them.

The filter is not thread-safe; use it from one thread (or guard it with a lock).
"""

from __future__ import annotations

import array
import heapq
import math
import re
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


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str, *, stem: bool = False) -> list[str]:
    """The tokens rouge_score's default tokenizer gives for ``text``.

    Without stemming the same steps in one pass (lower case, every run of characters
    outside ``[a-z0-9]`` a separator); with it, rouge_score's own tokenizer."""
    if not stem:
        return _NON_ALNUM.sub(" ", text.lower()).split()
    tokens: list[str] = _rs_tokenize.tokenize(text, _get_stemmer())
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

    __slots__ = ("counts", "ids", "length", "seq")

    def __init__(self, seq: Seq, ids: list[int], counts: dict[int, int]) -> None:
        self.seq = seq
        self.ids = ids  # token ids, 0 for tokens the pool has never seen
        self.length = len(ids)
        self.counts = counts  # token id -> count, only ids known to the pool


# An item is (token id, occurrence number); its integer key packs both.
_OCC_SHIFT = 32


# The global order is re-ranked by observed token frequency when the pool reaches these
# sizes, then frozen (see the module docstring).
_RERANK_AT = (1 << 10, 1 << 12, 1 << 14, 1 << 16)


_BUCKETS = 64
_NONE = np.empty(0, dtype=np.int32)
_NEVER = 1 << 30  # an overlap no text reaches
_Table = npt.NDArray[np.int32]
_SATURATED = 255


def _sketch(ids: Iterable[int]) -> npt.NDArray[np.uint8]:
    """Token counts hashed into buckets; a bucket that reaches 255 means "unknown".

    For two texts, the sum over buckets of the smaller count bounds their token-multiset
    overlap from above (tokens that share a bucket only add to it); unknown tokens (id 0)
    are left out. A saturated bucket makes the bound unusable, and the caller treats it so.
    """
    buckets = [(tid * 0x9E3779B1 >> 7) % _BUCKETS for tid in ids if tid]
    counts = np.bincount(np.array(buckets, dtype=np.int64), minlength=_BUCKETS)
    return np.minimum(counts, _SATURATED).astype(np.uint8)


class _PrefixRule:
    """The length filter and prefix sizes for one threshold (see the module docstring)."""

    __slots__ = ("_cache", "_tables", "ratio", "tp")

    def __init__(self, threshold: float) -> None:
        # F > t implies 2 * lcs / (la + lb) >= tp; clamped so the formulas stay finite.
        self.tp = min(max(threshold - _BOUND_EPS, 0.0), 1.0)
        self.ratio = self.tp / (2.0 - self.tp)  # lb >= la * ratio, o >= la * ratio
        self._cache: dict[int, tuple[int, int, int, int]] = {}
        self._tables: dict[tuple[int, int], tuple[_Table, _Table]] = {}

    def for_length(self, n: int) -> tuple[int, int, int, int]:
        """For a text of ``n`` tokens: ``(o_any, o_longer, shortest, longest)``.

        ``o_any`` is the least overlap it needs with a partner of any length, ``o_longer``
        with a partner at least as long; ``shortest`` and ``longest`` bound the partner's
        length. The small subtractions keep float rounding from making a bound stricter.
        """
        try:
            return self._cache[n]
        except KeyError:
            pass
        if self.tp <= 0.0:
            rule = (1, 1, 1, _NEVER)
        else:
            o_any = max(1, math.ceil(n * self.ratio - 1e-6))
            o_longer = max(1, math.ceil(n * self.tp - 1e-6))
            rule = (o_any, o_longer, o_any, math.floor(n / self.ratio + 1e-6))
        if len(self._cache) < 4096:
            self._cache[n] = rule
        return rule

    def need_tables(self, la: int, longest_entry: int) -> tuple[_Table, _Table]:
        """Least overlap a text of ``la`` tokens needs with one of each length ``lb``.

        Two tables indexed by ``lb`` in ``0..longest_entry``: for partners at least as
        long (``lb >= la``) and for shorter ones; other lengths, and lengths the length
        filter rules out, need more than any text has.
        """
        key = (la, longest_entry)
        tables = self._tables.get(key)
        if tables is None:
            _, _, shortest, longest = self.for_length(la)
            lb = np.arange(longest_entry + 1, dtype=np.float64)
            need = np.ceil(self.tp * (la + lb) / 2.0 - 1e-6)
            need[(lb < shortest) | (lb > longest)] = np.inf
            longer, shorter = need.copy(), need
            longer[lb < la] = np.inf
            shorter[lb >= la] = np.inf
            tables = (
                np.minimum(longer, _NEVER).astype(np.int32),
                np.minimum(shorter, _NEVER).astype(np.int32),
            )
            if len(self._tables) >= 4096:
                self._tables.clear()
            self._tables[key] = tables
        return tables


class NoveltyFilter:
    """Keep texts whose ROUGE-L against everything kept so far is ``<= threshold``.

    ``pool`` seeds the pool unconditionally (Self-Instruct's seed instructions). The score of
    a candidate ``text`` against a pool entry ``p`` is ``rouge_l(text, p, stem=stem)``
    (candidate as target, pool entry as prediction, as Self-Instruct scores it).

    ``prune=False`` scores every pair without any index or bound (a brute-force reference
    that gives the same results, used by the tests and the benchmark).
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
        self._longest = 0
        # id 0 is reserved for query tokens the pool has never seen: it matches nothing.
        self._vocab: dict[str, int] = {}
        self._as_text = True
        self._rule = _PrefixRule(threshold)
        self._rule_threshold = threshold
        # Prefix indexes (for threshold decisions): item key -> flat (entry, length,
        # length - position) triples, one per pool entry whose prefix holds the item. The
        # long prefixes serve partners no longer than the entry, the short ones (a part
        # of the long ones) serve longer partners.
        self._prefix: dict[int, array.array[int]] = {}
        self._short: dict[int, array.array[int]] = {}
        # Per entry, its token counts hashed into _BUCKETS buckets (saturating at 255).
        self._sketch: npt.NDArray[np.uint8] = np.zeros((64, _BUCKETS), dtype=np.uint8)
        self._saturated = False  # whether any entry's sketch has a saturated bucket
        # Global item order: _order[tid] for ranked tokens (by frequency, rarest first);
        # tokens first seen after the last re-ranking sort before all of them, newest first.
        self._freq: list[int] = [0]
        self._order: list[int] = []
        # Full inverted index (for exact maxima), built on first use.
        self._full = False
        # The last text a query was made of, and its tokens: ``add`` right after a
        # judgement of the same text does not tokenise it again.
        self._last: tuple[str, bool, list[str]] = ("", False, [])
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
        last_text, last_stem, last_tokens = self._last
        if text == last_text and last_stem == self.stem:
            tokens = last_tokens
        else:
            tokens = tokenize(text, stem=self.stem)
        ids: list[int] = []
        vocab = self._vocab
        for token in tokens:
            tid = vocab.get(token)
            if tid is None:
                tid = len(vocab) + 1
                vocab[token] = tid
                self._freq.append(0)
            self._freq[tid] += 1
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
        self._longest = max(self._longest, len(ids))
        # Indexed even with prune=False, so that turning pruning on later stays exact.
        if len(self._texts) in _RERANK_AT:
            self._rerank()  # indexes the new entry too
        elif self._rule_threshold != self.threshold:
            self._reindex()  # likewise
        else:
            if entry == len(self._sketch):
                self._sketch = np.concatenate([self._sketch, np.zeros_like(self._sketch)])
            self._set_sketch(entry, ids)
            self._index_prefix(entry, ids, self._rule)
        if self._full:
            self._index_full(entry, ids)

    def _ids(self, entry: int) -> list[int]:
        seq = self._seqs[entry]
        return [ord(c) for c in seq] if isinstance(seq, str) else seq

    def _current_rule(self) -> _PrefixRule:
        """The prefix rule for the current threshold; re-index if the threshold changed."""
        if self._rule_threshold != self.threshold:
            self._reindex()
        return self._rule

    def _rerank(self) -> None:
        """Order tokens by their frequency in the pool so far (rarest first); re-index."""
        freq = self._freq
        ranked = sorted(range(1, len(freq)), key=lambda tid: (freq[tid], -tid))
        order = [0] * len(freq)
        for rank, tid in enumerate(ranked):
            order[tid] = rank
        self._order = order
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the prefix index and the sketches for the current order and threshold."""
        rule = self._rule = _PrefixRule(self.threshold)
        self._rule_threshold = self.threshold
        self._prefix = {}
        self._short = {}
        self._sketch = np.zeros((max(64, len(self._lens_buf)), _BUCKETS), dtype=np.uint8)
        self._saturated = False
        for entry in range(len(self._texts)):
            ids = self._ids(entry)
            self._set_sketch(entry, ids)
            self._index_prefix(entry, ids, rule)

    def _set_sketch(self, entry: int, ids: list[int]) -> None:
        sketch = _sketch(ids)
        self._sketch[entry] = sketch
        if not self._saturated and int(sketch.max(initial=0)) == _SATURATED:
            self._saturated = True

    def _sorted_items(self, ids: Iterable[int]) -> list[int]:
        """Item keys of the known tokens in ``ids``, in the global order (rarest first).

        An item is the ``k``-th occurrence of a token; its key packs the token id and ``k``.
        Unknown tokens (id 0) are left out: they match nothing.
        """
        order = self._order
        ranked = len(order)
        seen: dict[int, int] = {}
        keyed: list[tuple[int, int, int]] = []
        for tid in ids:
            if tid == 0:
                continue
            k = seen.get(tid, 0)
            seen[tid] = k + 1
            keyed.append((order[tid] if tid < ranked else -tid, k, tid))
        keyed.sort()
        return [tid | (k << _OCC_SHIFT) for _, k, tid in keyed]

    def _index_prefix(self, entry: int, ids: list[int], rule: _PrefixRule) -> None:
        n = len(ids)
        if n == 0:
            return
        o_any, o_longer, _, _ = rule.for_length(n)
        items = self._sorted_items(ids)
        long_end, short_end = max(0, n - o_any + 1), max(0, n - o_longer + 1)
        for index, end in ((self._prefix, long_end), (self._short, short_end)):
            for pos in range(end):
                item = items[pos]
                postings = index.get(item)
                if postings is None:
                    index[item] = array.array("i", (entry, n, n - pos))
                else:
                    postings.extend((entry, n, n - pos))

    def _index_full(self, entry: int, ids: list[int]) -> None:
        for tid, count in Counter(ids).items():
            postings = self._post_idx.get(tid)
            if postings is None:
                self._post_idx[tid] = array.array("i", (entry,))
                self._post_cnt[tid] = array.array("i", (count,))
            else:
                postings.append(entry)
                self._post_cnt[tid].append(count)

    def _ensure_full(self) -> None:
        if not self._full:
            self._full = True
            for entry in range(len(self._texts)):
                self._index_full(entry, self._ids(entry))

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
        tokens = tokenize(text, stem=self.stem)
        self._last = (text, self.stem, tokens)
        ids = [vocab.get(token, 0) for token in tokens]
        counts = Counter(ids)
        counts.pop(0, None)
        return _Query(self._encode(ids), ids, dict(counts))

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

    @staticmethod
    def _probe(
        index: dict[int, array.array[int]], items: list[int], known: int, table: _Table
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """Entries of ``index`` hit by the probe ``items`` that pass the length filter
        (folded into ``table``) and the positional filter, with the overlap each needs
        (an entry may repeat)."""
        parts: list[npt.NDArray[np.int32]] = []
        probe_of: list[int] = []
        for i, item in enumerate(items):
            postings = index.get(item)
            if postings is not None:
                # A view, alive only inside this call (the array must stay free to grow).
                parts.append(np.frombuffer(postings, dtype=np.int32))
                probe_of.append(i)
        if not parts:
            return _NONE, _NONE
        # Per hit: the entry, its length, and how many of its items start at the hit.
        # Positional filter: a pair's shared items all lie at or after its first hit in
        # both texts, so it needs ``need <= room`` on both sides there. A later hit of the
        # same pair has less room, so testing every hit keeps exactly the pairs whose first
        # hit passes.
        room: npt.NDArray[np.int64] | int
        if len(parts) == 1:
            hits = parts[0].reshape(-1, 3)
            room = known - probe_of[0]
        else:
            hits = np.concatenate(parts).reshape(-1, 3)
            room = np.repeat(known - np.array(probe_of), [len(p) // 3 for p in parts])
        need = table[hits[:, 1]]
        keep = (need <= hits[:, 2]) & (need <= room)
        return hits[:, 0][keep], need[keep]

    def _prefix_candidates(self, query: _Query) -> npt.NDArray[np.intp]:
        """Pool entries that could score above the threshold (a superset, by the bound)."""
        rule = self._current_rule()
        la = query.length
        o_any, o_longer, _, _ = rule.for_length(la)
        items = self._sorted_items(query.ids)
        known = len(items)
        longer, shorter = rule.need_tables(la, self._longest)
        # Partners at least as long: the query's short prefix against their long prefixes.
        # Shorter partners: the query's long prefix against their short prefixes.
        found = [
            self._probe(self._prefix, items[: max(0, known - o_longer + 1)], known, longer),
            self._probe(self._short, items[: max(0, known - o_any + 1)], known, shorter),
        ]
        entries = np.concatenate([f[0] for f in found])
        if len(entries) == 0:
            return np.empty(0, dtype=np.intp)
        need = np.concatenate([f[1] for f in found])
        # The overlap of the token multisets is at most the sum of per-bucket minima
        # (entries hit twice are tested twice: cheaper than making them unique first).
        shared = np.minimum(self._sketch.take(entries, axis=0), _sketch(query.ids))
        bound = shared.sum(axis=1, dtype=np.uint16)  # at most 64 * 255
        if self._saturated:
            bound = bound.astype(np.int64)
            bound[(shared == _SATURATED).any(axis=1)] = la
        survivors = entries[bound >= need]
        if len(survivors) > 1:
            survivors = np.unique(survivors)
        candidates: npt.NDArray[np.intp] = survivors.astype(np.intp)
        return candidates

    def _shared(self, query: _Query) -> npt.NDArray[np.int64]:
        """Per pool entry, the size of its token multiset's overlap with ``query``'s."""
        self._ensure_full()
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
        return shared

    def _bounded(self, query: _Query) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        """Entries sharing a token with ``query`` and their upper bounds ``2m/(la+lb)``."""
        shared = self._shared(query)
        entries = np.flatnonzero(shared)
        bounds = 2.0 * shared[entries] / (query.length + self._lens_np[entries])
        return entries, bounds

    def _brute_scores(self, query: _Query) -> list[float]:
        return [self._score(query, entry) for entry in range(len(self._texts))]

    def max_similarity(self, text: str) -> float:
        """Highest ROUGE-L of ``text`` against the pool (0.0 for an empty pool).

        Fast when the answer is above the threshold (only the prefix candidates can reach
        it); otherwise it needs the full index and its cost grows with the pool.
        """
        query = self._query(text)
        if query.length == 0 or not self._texts:
            return 0.0
        if not self.prune:
            return max(self._brute_scores(query))
        if self.threshold >= 0.0:
            candidates = self._prefix_candidates(query)
            if len(candidates):
                best = float(self._score_many(query, candidates).max())
                if best > self.threshold:
                    return best  # every pair above the threshold is a candidate
        return self._best(query)[0]

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
        if not self.threshold >= 0.0:
            return False  # every score (even 0.0 against an unrelated text) is above it
        candidates = self._prefix_candidates(query)
        n = len(candidates)
        if n == 0:
            return True
        threshold = self.threshold
        head = min(n, _SCALAR_BATCH)
        for k in range(head):
            if self._score(query, int(candidates[k])) > threshold:
                return False
        if head == n:
            return True
        return not bool((self._score_many(query, candidates[head:]) > threshold).any())

    def judge(self, text: str, *, score: bool = True) -> tuple[bool, float | None, str | None]:
        """``(novel, max similarity, most similar entry)`` for ``text``, in one pass; no
        change to the pool.

        ``novel`` equals ``is_novel(text)``. When ``text`` is not novel the score equals
        ``max_similarity(text)`` and the entry equals ``top_similar(text, 1)[0][0]`` (the
        earliest of the best). When it is novel the entry is None and the score is the
        exact maximum if ``score`` is true, else None.

        With ``score`` one bounded pass over the pool answers everything (its cost grows
        with the pool); without it only the prefix candidates are scored (flat in the
        pool's size), which hold every entry above the threshold.
        """
        query = self._query(text)
        if query.length == 0 or not self._texts:
            return True, 0.0 if score else None, None
        if not self.prune or not self.threshold >= 0.0:
            novel = self.is_novel(text)
            if novel and not score:
                return True, None, None
            best = self.max_similarity(text)
            return novel, best, None if novel else self.top_similar(text, 1)[0][0]
        if score:
            # The exact maximum is wanted anyway: one bounded pass over the pool gives it
            # and the earliest entry reaching it (the prefix candidates would only add a
            # pass).
            best, entry = self._best(query)
            if best > self.threshold:
                return False, best, self._texts[entry]
            return True, best, None
        candidates = self._prefix_candidates(query)
        if len(candidates):
            scores = self._score_many(query, candidates)
            top = int(scores.argmax())  # candidates ascend: the earliest of the best
            best = float(scores[top])
            if best > self.threshold:
                return False, best, self._texts[int(candidates[top])]
        return True, None, None

    def _best(self, query: _Query) -> tuple[float, int]:
        """The exact maximum score and the earliest entry reaching it (-1: none shares
        a token). Every entry whose bound reaches the maximum is scored, so ties at the
        maximum are all seen.

        Bounds are made over the whole pool in one vector pass (0 where nothing is
        shared; the same arithmetic, so the same bits, as ``_bounded``): cheaper than
        gathering every sharing entry first, as most are then pruned. The entry with the
        best bound is scored first: its score is a floor for the maximum."""
        all_bounds = 2.0 * self._shared(query) / (query.length + self._lens_np)
        first = int(np.argmax(all_bounds))
        if all_bounds[first] == 0.0:
            return 0.0, -1
        best, arg = self._score(query, first), first
        entries = np.flatnonzero(all_bounds >= best - _BOUND_EPS)
        bounds = all_bounds[entries]
        order = np.argsort(-bounds, kind="stable")
        entries, bounds = entries[order], bounds[order]
        n = len(entries)
        head = min(n, _SCALAR_BATCH)
        for k in range(head):
            if bounds[k] < best - _BOUND_EPS:
                return best, arg
            entry = int(entries[k])
            score = self._score(query, entry)
            if score > best or (score == best and entry < arg):
                best, arg = score, entry
        if head == n:
            return best, arg
        rest = entries[head:][bounds[head:] >= best - _BOUND_EPS]
        if len(rest) == 0:
            return best, arg
        scores = self._score_many(query, rest)
        top = float(scores.max())
        if top > best or (top == best and int(rest[scores == top].min()) < arg):
            best, arg = top, int(rest[scores == top].min())
        return best, arg

    def offer(self, text: str) -> bool:
        """Add ``text`` when it is novel (max similarity ``<= threshold``); say whether it was."""
        if self.is_novel(text):
            self.add(text)
            return True
        return False
