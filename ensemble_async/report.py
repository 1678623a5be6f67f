"""The run report: figures about a records file, computed in one streaming pass.

``python -m ensemble_async report OUTPUT`` (a records file or its run directory) writes
``report.json`` (every figure) and ``report.html`` (the same figures drawn as inline SVG
by :mod:`ensemble_async.report_html`; it opens without a network).

This module reads files and counts; it never calls a model.  It reads the records and
the rejects line by line (``read_records``), and when present the run's JSON-lines log
(``generate --log-jsonl``) and ``summary.json``; fields other parts of the project may
add (served model ids, timestamps, prices, licences) are used when present, never
required.  Memory is bounded whatever the file size: fixed-size histograms, reservoir
samples, top-k heaps and capped counters (:mod:`ensemble_async.sketches`).

Methods, as the report states them:

* lengths are whitespace tokens (``str.split``);
* the opening-verb figure takes the instruction's first word, lowercased, as the verb and
  the first later word that is alphabetic and not a function word as its object;
* "highest ROUGE-L at acceptance" is the score the pipeline's novelty filter recorded
  (``provenance.novelty_max_rouge``: against the seed tasks and every instruction
  accepted before it for its type) -- exact, for every record; records without it are
  scored against a sliding window of the previous 1,000-2,000 kept instructions of their
  type (a lower bound); "highest ROUGE-L against the seed tasks" is exact, for a uniform
  sample of kept instructions (:data:`DIVERSITY_SAMPLE`);
* the member x member ROUGE-L matrix is computed on a uniform sample of decisions
  (:data:`AGREEMENT_SAMPLE`); the exact-agreement rates count every decision.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from .consensus import normalize, reference_similarity
from .reasons import anchor, describe
from .records import RecordFileError, default_rejects_path, read_records
from .rouge import NoveltyFilter
from .sketches import BoundedCounter, Histogram, Reservoir, TimeSeries

__all__ = [
    "AGREEMENT_SAMPLE",
    "DIVERSITY_SAMPLE",
    "ReportBuilder",
    "ReportError",
    "RunFiles",
    "add_report_parser",
    "build_report",
    "find_run_files",
    "run_report",
    "verb_and_object",
    "write_report",
]

FAILED_STATUSES = ("failed", "unavailable", "circuit_open")
"""Candidate statuses counted as a member's failure (its own reason, or unavailable)."""

EXIT_OK = 0
EXIT_USAGE = 2  # bad input (the documented exit codes of ``python -m ensemble_async``)
EXIT_OUTPUT = 4

AGREEMENT_SAMPLE = 5_000
DIVERSITY_SAMPLE = 5_000
RECORD_SAMPLE = 12
REJECT_SAMPLE = 6
NEAR_MISSES = 10
LENGTH_CAP = 512
WINDOW = 1_000
_FUNCTION_WORDS = (
    "a an the this that these those each every some any all of to for in on at by with "
    "from into about as and or if how what which who whom whose why when where is are be "
    "it its their your my our his her me us them you i we they given following below "
    "above one two three several more most short brief new"
)
STOPWORDS = frozenset(_FUNCTION_WORDS.split())
_WORD = re.compile(r"[a-z][a-z'-]*")


class ReportError(Exception):
    """The report cannot be made: the input is missing or corrupt, or the output unwritable."""


# -- the files of a run ---------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """The files a report reads; only ``records`` is required."""

    records: Path
    rejects: Path | None
    log: Path | None
    summary: Path | None


def _is_log(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline(65536)
        value = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and value.get("type") == "start"


def find_run_files(
    target: Path, *, rejects: Path | None = None, log: Path | None = None
) -> RunFiles:
    """Resolve ``target`` (a records file or a run directory) to the run's files."""
    if target.is_dir():
        candidates = sorted(
            p
            for p in target.glob("*.jsonl")
            if not p.name.endswith(".rejects.jsonl") and not _is_log(p) and p.is_file()
        )
        named = [p for p in candidates if p.name == "records.jsonl"]
        if named:
            records = named[0]
        elif len(candidates) == 1:
            records = candidates[0]
        elif not candidates:
            raise ReportError(f"{target}: no records file (*.jsonl) in this directory")
        else:
            names = ", ".join(p.name for p in candidates)
            raise ReportError(f"{target}: several records files ({names}); name one")
    elif target.is_file():
        records = target
    else:
        raise ReportError(f"{target}: no such file or directory")
    folder = records.parent
    if rejects is None:
        guess = default_rejects_path(records)
        rejects = guess if guess.is_file() else None
    elif not rejects.is_file():
        raise ReportError(f"{rejects}: rejects file not found")
    if log is None:
        logs = sorted(p for p in folder.glob("*.jsonl") if p != records and _is_log(p))
        log = logs[0] if logs else None
    elif not log.is_file():
        raise ReportError(f"{log}: log file not found")
    summary = None
    for name in (f"{records.stem}.summary.json", "summary.json"):
        if (folder / name).is_file():
            summary = folder / name
            break
    return RunFiles(records, rejects, log, summary)


# -- the builder ----------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _tokens(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def verb_and_object(instruction: str) -> tuple[str, str | None] | None:
    """The opening verb (first word, lowercased) and the first later content word."""
    words = _WORD.findall(instruction.lower())
    if not words:
        return None
    for word in words[1:]:
        if word not in STOPWORDS and not word.endswith("ly") and len(word) > 1:
            return words[0], word
    return words[0], None


@dataclass
class _Member:
    label: str
    index: int
    given: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    wins: int = 0
    eligible: int = 0
    completion_tokens: int = 0
    models: Counter[str] = field(default_factory=Counter)


_TS_KEYS = ("finished_at", "timestamp", "ts", "created_at", "time")
_TS_KEYS_SET = frozenset((*_TS_KEYS, "timestamps"))


def _timestamp(record: dict[str, Any]) -> float | None:
    """A record's finish time in seconds (epoch or ISO 8601), when it carries one."""
    prov = record.get("provenance")
    if not _TS_KEYS_SET.intersection(record) and not (
        isinstance(prov, dict) and _TS_KEYS_SET.intersection(prov)
    ):
        return None
    places = [record]
    if isinstance(prov, dict):
        places.append(prov)
        times = prov.get("timestamps") or record.get("timestamps")
        if isinstance(times, dict):
            places.insert(0, times)
    for place in places:
        for key in _TS_KEYS:
            value = place.get(key)
            n = _num(value)
            if n is not None:
                return n
            if isinstance(value, str):
                try:
                    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
    return None


class ReportBuilder:
    """Accumulates the figures record by record; :meth:`result` returns them as a dict.

    ``seeds``: the seed instructions the diversity figure compares against.
    """

    def __init__(self, *, seeds: Sequence[str] = (), rng_seed: int = 0) -> None:
        rng = random.Random(rng_seed)
        self.seeds = list(seeds)
        self.kept = 0
        self.consensus_rejects = 0
        self.answered = 0
        self.by_type: Counter[str] = Counter()
        self.rejects: Counter[tuple[str, str]] = Counter()
        self.reject_types: Counter[tuple[str, str]] = Counter()
        self.rules: Counter[tuple[str, str]] = Counter()
        self.thresholds: Counter[float] = Counter()
        self.min_pairwise = {"kept": Histogram(0.0, 1.0, 50), "rejected": Histogram(0.0, 1.0, 50)}
        self.members: dict[str, _Member] = {}
        self.pairs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.agreement_sample = Reservoir(AGREEMENT_SAMPLE, rng)
        self.diversity_sample = Reservoir(DIVERSITY_SAMPLE, rng)
        self.novelty = Histogram(0.0, 1.0, 20)
        self.novelty_source: Counter[str] = Counter()
        self._windows: dict[str, list[NoveltyFilter]] = {}
        self.verbs = BoundedCounter(20_000)
        self.verb_objects = BoundedCounter(50_000)
        self.lengths: dict[tuple[str, str], Histogram] = {}
        self.record_sample = Reservoir(RECORD_SAMPLE, rng)
        self.reject_sample = Reservoir(REJECT_SAMPLE, rng)
        self._near: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = 0
        self.presets: Counter[str] = Counter()
        self.run_seeds: Counter[int] = Counter()
        self.times = TimeSeries()
        self._t0: float | None = None
        self.log_times = TimeSeries()
        self.log_summary: dict[str, Any] | None = None
        self.log_start: dict[str, Any] | None = None

    # ---- records and rejects

    def add_record(self, record: dict[str, Any]) -> None:
        """One kept record."""
        self.kept += 1
        kind = str(record.get("type") or "unknown")
        self.by_type[kind] += 1
        for part in ("instruction", "input", "output"):
            key = (kind, part)
            if key not in self.lengths:
                self.lengths[key] = Histogram(0, LENGTH_CAP, LENGTH_CAP)
            self.lengths[key].add(_tokens(record.get(part)))
        instruction = record.get("instruction")
        prov = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
        assert isinstance(prov, dict)
        if isinstance(instruction, str):
            self._diversity(kind, instruction, prov)
        self._decision(record, prov, kept=True)
        slot = self.record_sample.slot()
        if slot is not None:
            self.record_sample.put(slot, _brief(record))
        ts = _timestamp(record)
        if ts is not None:
            if self._t0 is None:
                self._t0 = ts
            self.times.add(ts - self._t0)

    def add_reject(self, reject: dict[str, Any]) -> None:
        """One reject line."""
        stage = str(reject.get("stage") or "unknown")
        reason = str(reject.get("reason") or "unknown")
        self.rejects[(stage, reason)] += 1
        self.reject_types[(stage, str(reject.get("type") or "unknown"))] += 1
        prov = reject.get("provenance")
        if stage == "consensus":
            self.consensus_rejects += 1
            if isinstance(prov, dict):
                self._decision(reject, prov, kept=False)
                slot = self.reject_sample.slot()
                if slot is not None:
                    self.reject_sample.put(slot, _brief(reject))

    def _diversity(self, kind: str, instruction: str, prov: dict[str, Any]) -> None:
        score = _num(prov.get("novelty_max_rouge"))
        if score is not None:
            self.novelty_source["recorded"] += 1
        else:
            windows = self._windows.setdefault(kind, [NoveltyFilter([]), NoveltyFilter([])])
            score = max(w.max_similarity(instruction) if len(w) else 0.0 for w in windows)
            windows[1].add(instruction)
            if len(windows[1]) >= WINDOW:
                windows[0], windows[1] = windows[1], NoveltyFilter([])
            self.novelty_source["window"] += 1
        self.novelty.add(score)
        self.diversity_sample.offer((instruction, score))
        pair = verb_and_object(instruction)
        if pair is not None:
            self.verbs.add(pair[0])
            if pair[1] is not None:
                self.verb_objects.add(pair)

    def _decision(self, record: dict[str, Any], prov: dict[str, Any], *, kept: bool) -> None:
        preset = prov.get("preset")
        if isinstance(preset, str):
            self.presets[preset] += 1
        seed = prov.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            self.run_seeds[seed] += 1
        decision = prov.get("decision") if isinstance(prov.get("decision"), dict) else {}
        assert isinstance(decision, dict)
        rule = decision.get("rule") or (None if kept else record.get("reason")) or "unknown"
        self.rules[("kept" if kept else "rejected", str(rule))] += 1
        low = _num(decision.get("min_pairwise"))
        if low is not None:
            self.min_pairwise["kept" if kept else "rejected"].add(low)
        threshold = _num(decision.get("threshold"))
        if threshold is not None:
            self.thresholds[threshold] += 1
        if not kept and low is not None:
            self._seq += 1
            if len(self._near) < NEAR_MISSES:
                heapq.heappush(self._near, (low, -self._seq, _brief(record)))
            elif (low, -self._seq) > self._near[0][:2]:
                heapq.heapreplace(self._near, (low, -self._seq, _brief(record)))
        candidates = prov.get("candidates")
        if not isinstance(candidates, list):
            return
        texts: dict[str, str] = {}
        winner = decision.get("index")
        any_answer = False
        for c in candidates:
            if not isinstance(c, dict):
                continue
            label, index = _slot(c)
            member = self.members.get(label)
            if member is None:
                member = self.members[label] = _Member(label, index)
            status = str(c.get("status") or "unknown")
            member.statuses[status] += 1
            model = c.get("model")
            if isinstance(model, str) and len(member.models) < 20:
                member.models[model] += 1
            tokens = c.get("completion_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                member.completion_tokens += tokens
            text = c.get("text")
            if status in ("ok", "given") and isinstance(text, str):
                member.given += 1
                texts[label] = text
                if status == "ok":
                    any_answer = True
                if kept:
                    member.eligible += 1
                    if c.get("index") == winner:
                        member.wins += 1
        if any_answer:
            self.answered += 1
        labels = sorted(texts, key=lambda x: self.members[x].index)
        norms = {label: normalize(texts[label]) for label in labels}
        for a_pos, a in enumerate(labels):
            for b in labels[a_pos + 1 :]:
                counts = self.pairs[(a, b)]
                counts[0] += 1
                counts[1] += bool(norms[a]) and norms[a] == norms[b]
        if len(labels) > 1:
            self.agreement_sample.offer(norms)

    # ---- the log and summary

    def add_log_line(self, line: dict[str, Any]) -> None:
        """One line of a ``--log-jsonl`` progress log."""
        kind = line.get("type")
        if kind == "start":
            self.log_start = line
        elif kind == "summary":
            self.log_summary = line
        elif (
            kind == "event" and line.get("stage") == "consensus" and line.get("kind") == "accepted"
        ):
            t = _num(line.get("t"))
            if t is not None:
                self.log_times.add(t)

    # ---- the result

    def result(
        self,
        *,
        files: RunFiles | None = None,
        summary: dict[str, Any] | None = None,
        prices: dict[str, tuple[float, float]] | None = None,
    ) -> dict[str, Any]:
        """Every figure as a JSON-ready dict."""
        threshold = self.thresholds.most_common(1)[0][0] if self.thresholds else None
        stage_rejects: Counter[str] = Counter()
        for (stage, _), n in self.rejects.items():
            stage_rejects[stage] += n
        instances = self.kept + self.consensus_rejects
        kept_instructions = instances + stage_rejects["instances"]
        attempted = kept_instructions + stage_rejects["instructions"]
        report: dict[str, Any] = {
            "files": {
                k: (None if v is None else str(v))
                for k, v in (vars(files).items() if files is not None else [])
            },
            "preset": [p for p, _ in self.presets.most_common()],
            "run_seed": [s for s, _ in self.run_seeds.most_common()],
            "funnel": [
                {"stage": "instructions attempted", "count": attempted},
                {"stage": "instructions kept", "count": kept_instructions},
                {"stage": "instances (valid)", "count": instances},
                {"stage": "answered (>= 1 answer)", "count": self.answered},
                {"stage": "consensus kept (records)", "count": self.kept},
            ],
            "rejects": [
                {
                    "stage": stage,
                    "reason": reason,
                    "count": n,
                    "meaning": _meaning(reason),
                    "doc": f"docs/reasons.md#{anchor(reason)}",
                }
                for (stage, reason), n in sorted(
                    self.rejects.items(), key=lambda kv: (_STAGE_ORDER.get(kv[0][0], 9), -kv[1])
                )
            ],
            "records_by_type": dict(self.by_type),
            "members": self._members(summary, prices),
            "consensus": {
                "threshold": threshold,
                "rules": [
                    {"outcome": outcome, "rule": rule, "count": n, "meaning": _meaning(rule)}
                    for (outcome, rule), n in self.rules.most_common()
                ],
                "min_pairwise": {k: h.to_dict() for k, h in self.min_pairwise.items()},
            },
            "diversity": self._diversity_result(),
            "lengths": {
                kind: {part: h.to_dict() for (k, part), h in self.lengths.items() if k == kind}
                for kind in sorted({k for k, _ in self.lengths})
            },
            "throughput": self._throughput(),
            "samples": {
                "records": self.record_sample.items,
                "consensus_rejects": self.reject_sample.items,
            },
            "near_misses": [item for _, _, item in sorted(self._near, reverse=True)],
            "methods": METHODS,
        }
        report["run_backends"] = _run_backends(self.log_start, summary)
        if summary is not None:
            report["summary"] = {
                k: v for k, v in summary.items() if isinstance(v, str | int | float | bool)
            }
        return report

    def _members(
        self, summary: dict[str, Any] | None, prices: dict[str, tuple[float, float]] | None
    ) -> dict[str, Any]:
        ordered = sorted(self.members.values(), key=lambda m: (m.index, m.label))
        labels = [m.label for m in ordered]
        run_tokens = _run_tokens(self.log_summary, summary)
        prices = {**_summary_prices(summary), **_summary_prices(self.log_summary), **(prices or {})}
        rows = []
        for m in ordered:
            failures = sum(n for s, n in m.statuses.items() if s in FAILED_STATUSES)
            row: dict[str, Any] = {
                "member": m.label,
                "index": m.index,
                "given": m.given,
                "failures": failures,
                "statuses": dict(m.statuses),
                "wins": m.wins,
                "win_rate": m.wins / m.eligible if m.eligible else None,
                "completion_tokens_in_records": m.completion_tokens,
                "models": [name for name, _ in m.models.most_common(3)],
            }
            rows.append(row)
        backends = []
        for name, (prompt, completion) in sorted(run_tokens.items()):
            entry: dict[str, Any] = {
                "backend": name,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost_usd": None,
            }
            if name in prices:
                p_in, p_out = prices[name]
                entry["cost_usd"] = (prompt * p_in + completion * p_out) / 1e6
                entry["price_per_mtok"] = {"prompt": p_in, "completion": p_out}
            backends.append(entry)
        n = len(labels)
        exact: list[list[float | None]] = [[None] * n for _ in range(n)]
        rouge_sum = [[0.0] * n for _ in range(n)]
        rouge_n = [[0] * n for _ in range(n)]
        pos = {label: i for i, label in enumerate(labels)}
        for (a, b), (total, equal) in self.pairs.items():
            i, j = pos[a], pos[b]
            exact[i][j] = exact[j][i] = equal / total if total else None
        for norms in self.agreement_sample.items:
            ls = list(norms)
            for x in range(len(ls)):
                for y in range(x + 1, len(ls)):
                    a, b = ls[x], ls[y]
                    if norms[a] and norms[a] == norms[b]:
                        s = 1.0
                    elif not norms[a] or not norms[b]:
                        s = 0.0
                    else:
                        s = reference_similarity(norms[a], norms[b])
                    i, j = pos[a], pos[b]
                    for u, v in ((i, j), (j, i)):
                        rouge_sum[u][v] += s
                        rouge_n[u][v] += 1
        rouge: list[list[float | None]] = [
            [None if rouge_n[i][j] == 0 else rouge_sum[i][j] / rouge_n[i][j] for j in range(n)]
            for i in range(n)
        ]
        for i in range(n):
            exact[i][i] = rouge[i][i] = 1.0
        return {
            "rows": rows,
            "labels": labels,
            "exact_agreement": exact,
            "mean_rouge_l": rouge,
            "rouge_sample": len(self.agreement_sample.items),
            "decisions": self.agreement_sample.seen,
            "backends": backends,
        }

    def _diversity_result(self) -> dict[str, Any]:
        seeds_hist = Histogram(0.0, 1.0, 20)
        nearest_earlier = 0
        if self.seeds:
            pool = NoveltyFilter(self.seeds)
            for instruction, recorded in self.diversity_sample.items:
                score = pool.max_similarity(instruction)
                seeds_hist.add(score)
                nearest_earlier += recorded > score + 1e-12
        verbs = []
        pairs = self.verb_objects.counts
        by_verb: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for (verb, obj), n in pairs.most_common():
            if len(by_verb[verb]) < 4:
                by_verb[verb].append((obj, n))
        for verb, n in self.verbs.most_common(20):
            verbs.append(
                {
                    "verb": verb,
                    "count": n,
                    "objects": [{"object": o, "count": c} for o, c in by_verb.get(verb, [])],
                }
            )
        sampled = len(self.diversity_sample.items)
        return {
            "at_acceptance": self.novelty.to_dict(),
            "at_acceptance_source": dict(self.novelty_source),
            "vs_seeds": seeds_hist.to_dict(),
            "vs_seeds_sample": sampled if self.seeds else 0,
            "nearest_was_earlier_instruction": (
                nearest_earlier / sampled if self.seeds and sampled else None
            ),
            "verbs": verbs,
            "verbs_approximate": self.verbs.pruned or self.verb_objects.pruned,
        }

    def _throughput(self) -> dict[str, Any]:
        if any(self.log_times.counts):
            return {"source": "log", "unit": "records", **self.log_times.to_dict()}
        if any(self.times.counts):
            return {"source": "record timestamps", "unit": "records", **self.times.to_dict()}
        return {"source": None, "unit": "records", "bin_s": None, "counts": []}


_STAGE_ORDER = {"instructions": 0, "instances": 1, "answers": 2, "consensus": 3}

METHODS = {
    "lengths": "whitespace tokens (str.split), per record type; bins of 1 token, last bin "
    f"holds >= {LENGTH_CAP - 1}",
    "verbs": "first word of the instruction, lowercased, is the verb; its object is the "
    "first later alphabetic word that is not a function word or an -ly adverb",
    "at_acceptance": "the ROUGE-L the pipeline's novelty filter recorded "
    "(provenance.novelty_max_rouge) against the seed tasks and every instruction accepted "
    "before it for its type -- exact, every record; records without it: against a sliding "
    f"window of the previous {WINDOW}-{2 * WINDOW} kept instructions of their type (a lower bound)",
    "vs_seeds": "exact ROUGE-L (rouge_score's F-measure, no stemming) against every seed "
    f"instruction, for a uniform sample of up to {DIVERSITY_SAMPLE} kept instructions",
    "agreement": "exact agreement (equal after normalising) over every decision; mean "
    "ROUGE-L of normalised texts with stemming (the consensus similarity) over a uniform "
    f"sample of up to {AGREEMENT_SAMPLE} decisions",
    "win_rate": "records whose kept candidate is this member's / records where it gave a candidate",
    "near_misses": "consensus rejects with the highest lowest-pairwise score below the threshold",
}


def _meaning(name: str) -> str | None:
    meaning = describe(name)
    return None if meaning is None else meaning.text


_SLOTS: dict[tuple[Any, Any, Any], tuple[str, int]] = {}


def _slot(c: dict[str, Any]) -> tuple[str, int]:
    """The member label and position of a candidate (memoised: few distinct slots)."""
    key = (c.get("index"), c.get("source"), c.get("prompt_style"))
    try:
        return _SLOTS[key]
    except (KeyError, TypeError):
        pass
    found = _slot_of(c)
    if len(_SLOTS) < 10_000:
        with contextlib.suppress(TypeError):
            _SLOTS[key] = found
    return found


def _slot_of(c: dict[str, Any]) -> tuple[str, int]:
    index = c.get("index")
    index = index if isinstance(index, int) and not isinstance(index, bool) else 99
    source = str(c.get("source") or f"candidate-{index}")
    return (f"{source} (step 2)" if c.get("prompt_style") == "instance" else source), index


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    """What a sample shows of a record: its text, candidates and decision."""
    prov = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    assert isinstance(prov, dict)
    decision = prov.get("decision") if isinstance(prov.get("decision"), dict) else {}
    assert isinstance(decision, dict)
    cands = prov.get("candidates") if isinstance(prov.get("candidates"), list) else []
    assert isinstance(cands, list)
    return {
        "id": record.get("id"),
        "type": record.get("type"),
        "instruction": record.get("instruction"),
        "input": record.get("input"),
        "output": record.get("output"),
        "reason": record.get("reason"),
        "candidates": [
            {
                "index": c.get("index"),
                "source": c.get("source"),
                "status": c.get("status"),
                "text": c.get("text") if isinstance(c.get("text"), str) else c.get("error"),
            }
            for c in cands
            if isinstance(c, dict)
        ],
        "decision": {
            k: decision.get(k) for k in ("rule", "index", "min_pairwise", "threshold", "pairwise")
        },
    }


def _backend_entries(source: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not isinstance(source, dict):
        return []
    for key in ("backends", "members"):
        value = source.get(key)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict) and isinstance(v.get("name"), str)]
    return []


def _run_backends(*sources: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Name, kind, model and licence of each configured backend (no URL: it may hold
    credentials), from the log's start line or summary.json."""
    for source in sources:
        entries = _backend_entries(source)
        if entries:
            return [
                {k: e.get(k) for k in ("name", "kind", "model", "license") if e.get(k) is not None}
                for e in entries
            ]
    return []


def _run_tokens(*sources: dict[str, Any] | None) -> dict[str, tuple[int, int]]:
    for source in sources:
        tokens: dict[str, tuple[int, int]] = {}
        for entry in _backend_entries(source):
            p, c = entry.get("prompt_tokens"), entry.get("completion_tokens")
            if isinstance(p, int) and isinstance(c, int):
                tokens[entry["name"]] = (p, c)
        if tokens:
            return tokens
    return {}


def _price_pair(value: Any) -> tuple[float, float] | None:
    if not isinstance(value, dict):
        return None
    p = _num(value.get("prompt", value.get("input")))
    c = _num(value.get("completion", value.get("output")))
    if p is None or c is None:
        return None
    return p, c


def _summary_prices(source: dict[str, Any] | None) -> dict[str, tuple[float, float]]:
    """Prices in USD per million tokens, from ``prices: {name: {prompt, completion}}`` or
    a ``price`` on each backend entry."""
    out: dict[str, tuple[float, float]] = {}
    if not isinstance(source, dict):
        return out
    table = source.get("prices")
    if isinstance(table, dict):
        for name, value in table.items():
            pair = _price_pair(value)
            if pair is not None:
                out[str(name)] = pair
    for entry in _backend_entries(source):
        pair = _price_pair(entry.get("price"))
        if pair is not None:
            out[entry["name"]] = pair
    return out


# -- entry points ---------------------------------------------------------------------


def _read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for raw in f:
            try:
                value = json.loads(raw)
            except ValueError:
                continue  # a torn or foreign line in a log is not worth failing for
            if isinstance(value, dict):
                yield value


def _load_summary(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not a readable JSON summary ({exc})") from exc
    return value if isinstance(value, dict) else None


def build_report(
    files: RunFiles,
    *,
    seeds: Iterable[str] | None = None,
    prices: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Read the run's files once and return every figure (see the module doc)."""
    if seeds is None:
        from .seedtasks import load_seed_tasks

        seeds = [t.instruction for t in load_seed_tasks()]
    builder = ReportBuilder(seeds=list(seeds))
    try:
        for record in read_records(files.records):
            builder.add_record(record)
        if files.rejects is not None:
            for reject in read_records(files.rejects):
                builder.add_reject(reject)
        if files.log is not None:
            for line in _read_json_lines(files.log):
                builder.add_log_line(line)
    except RecordFileError as exc:
        raise ReportError(str(exc)) from exc
    except OSError as exc:
        raise ReportError(f"cannot read the run's files: {exc.strerror or exc}") from exc
    return builder.result(files=files, summary=_load_summary(files.summary), prices=prices)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (each replaced atomically)."""
    from .export import ExportError, write_text_atomic
    from .report_html import render_html

    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    try:
        write_text_atomic(json_path, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
        write_text_atomic(html_path, render_html(report))
    except ExportError as exc:
        raise ReportError(str(exc)) from exc
    return html_path, json_path


def _price_arg(text: str) -> tuple[str, tuple[float, float]]:
    name, sep, rest = text.partition("=")
    p, sep2, c = rest.partition(",")
    try:
        pair = (float(p), float(c))
    except ValueError:
        pair = None
    if not sep or not sep2 or not name or pair is None or min(pair) < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected BACKEND=PROMPT_USD,COMPLETION_USD (per million tokens)"
        )
    return name, pair


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report", help="write report.html and report.json about a run's records"
    )
    p.add_argument("target", type=Path, metavar="OUTPUT", help="records file or run directory")
    p.add_argument("--out", type=Path, help="folder for report.html/json (default: beside)")
    p.add_argument("--rejects", type=Path, help="rejects file (default: found beside)")
    p.add_argument("--log", type=Path, help="progress log from --log-jsonl (default: found)")
    p.add_argument("--seeds", type=Path, help="seed tasks for the diversity figure")
    p.add_argument(
        "--price",
        type=_price_arg,
        action="append",
        default=[],
        metavar="BACKEND=IN,OUT",
        help="USD per million prompt and completion tokens of a backend (repeatable)",
    )
    return p


def run_report(args: argparse.Namespace, console: Console) -> int:
    """``report``: exit 0, 2 for bad input, 4 when the report cannot be written."""
    err = Console(stderr=True)
    try:
        files = find_run_files(args.target, rejects=args.rejects, log=args.log)
        seeds = None
        if args.seeds is not None:
            from .seedtasks import SeedFormatError, load_seed_tasks

            try:
                seeds = [t.instruction for t in load_seed_tasks(args.seeds)]
            except (OSError, SeedFormatError) as exc:
                raise ReportError(f"--seeds {args.seeds}: {exc}") from exc
        report = build_report(files, seeds=seeds, prices=dict(args.price))
    except ReportError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    out = args.out if args.out is not None else files.records.parent
    try:
        html_path, json_path = write_report(report, out)
    except ReportError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_OUTPUT
    funnel = report["funnel"]
    console.print(
        f"{funnel[-1]['count']} records of {funnel[0]['count']} attempts -> {html_path}, "
        f"{json_path}",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK
