"""Synthetic run output: records and rejects files shaped like the pipeline's, fast to make.

For tests and benchmarks of the tools that read a run (report, show, export) at sizes a
real run against the doubles would take too long to produce.  Every line has the fields
the pipeline writes (see :mod:`ensemble_async.pipeline`); texts are random words, and the
decisions are consistent with their candidates (a shortcut names two equal candidates, a
medoid decision carries pairwise scores above its threshold, a consensus reject scores
below it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .ei_responder import _VERBS, _VOCAB

__all__ = ["MEMBERS", "synthetic_record", "synthetic_reject", "write_synthetic_run"]

MEMBERS = ("writer", "answerer", "third")
_INSTRUCTION_REASONS = ("not_novel", "too_short", "blacklisted:image", "bad_first_char")
_INSTANCE_REASONS = ("no_input_label", "no_output_label", "empty_output")


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(_VOCAB, k=rng.randint(low, high)))


def _candidates(rng: random.Random, truth: str, agree: float) -> list[dict[str, Any]]:
    out = []
    for index, source in enumerate(("writer", *MEMBERS)):
        failed = index == 3 and rng.random() < 0.05
        text = None if failed else (truth if rng.random() < agree else _words(rng, 2, 7))
        out.append(
            {
                "index": index,
                "source": source,
                "status": "failed" if failed else ("given" if index == 0 else "ok"),
                "text": text,
                "error": "ServerError: [third] HTTP 503" if failed else None,
                "finish_reason": None if failed else "stop",
                "completion_tokens": None if failed else len((text or "").split()) + 1,
                "prompt_style": "instance" if index == 0 else "zero_shot",
            }
        )
    return out


def _provenance(
    rng: random.Random, i: int, candidates: list[dict[str, Any]], decision: dict[str, Any]
) -> dict[str, Any]:
    return {
        "writer": "writer",
        "instruction_attempt": i + i // 8,
        "instruction_index": i,
        "novelty_max_rouge": round(rng.betavariate(4, 9), 6),
        "candidates": candidates,
        "decision": decision,
        "preset": "default",
        "seed": 7,
    }


def synthetic_record(rng: random.Random, i: int) -> dict[str, Any]:
    """One kept record, the ``i``-th."""
    kind = "input_output" if i % 3 else "output"
    instruction = f"{rng.choice(_VERBS)} {_words(rng, 4, 12)}."
    given = _words(rng, 3, 12) if kind == "input_output" else ""
    truth = _words(rng, 2, 9)
    candidates = _candidates(rng, truth, 0.75)
    texts = [c["text"] for c in candidates]
    index = next((k for k, t in enumerate(texts) if t is not None and texts.count(t) > 1), None)
    if index is not None:
        rule = "shortcut-first" if index == 0 else "shortcut-pair"
        decision = {"index": index, "kept": True, "rule": rule, "pairwise": [], "scores": []}
        decision.update(min_pairwise=None, threshold=0.01)
    else:
        index = 0
        candidates[0]["text"] = truth
        low = round(rng.uniform(0.02, 0.6), 6)
        decision = {"index": 0, "kept": True, "rule": "medoid", "pairwise": [[0, 1, low]]}
        decision.update(scores=[[0, low]], min_pairwise=low, threshold=0.01)
    decision.update(policy="exact", complete=True)
    output = str(candidates[index]["text"]).strip()
    rid = f"ei-{rng.getrandbits(64):016x}"
    return {
        "id": rid,
        "type": kind,
        "instruction": instruction,
        "input": given,
        "output": output,
        "provenance": _provenance(rng, i, candidates, decision),
    }


def synthetic_reject(rng: random.Random, i: int) -> dict[str, Any]:
    """One reject line: a step-1, step-3 or consensus reject."""
    kind = "input_output" if i % 3 else "output"
    rid = f"rj-{rng.getrandbits(64):016x}"
    roll = rng.random()
    if roll < 0.45:
        reason = rng.choice(_INSTRUCTION_REASONS)
        return {
            "id": rid,
            "stage": "instructions",
            "type": kind,
            "attempt": i,
            "seed": 7,
            "reason": reason,
            "text": f" {_words(rng, 1, 9)} ",
        }
    if roll < 0.75:
        return {
            "id": rid,
            "stage": "instances",
            "type": kind,
            "instruction": f"{rng.choice(_VERBS)} {_words(rng, 4, 10)}.",
            "reason": rng.choice(_INSTANCE_REASONS),
            "text": _words(rng, 3, 9),
        }
    candidates = _candidates(rng, _words(rng, 2, 7), 0.0)
    low = round(rng.uniform(0.0, 0.01), 6)
    decision = {
        "index": None,
        "kept": False,
        "rule": "below-threshold",
        "pairwise": [[0, 1, low]],
        "scores": [[0, low]],
        "best": 0,
        "min_pairwise": low,
        "threshold": 0.01,
        "policy": "exact",
        "complete": True,
    }
    return {
        "id": f"ei-{rng.getrandbits(64):016x}",
        "stage": "consensus",
        "reason": "below-threshold",
        "type": kind,
        "instruction": f"{rng.choice(_VERBS)} {_words(rng, 4, 10)}.",
        "input": _words(rng, 3, 9) if kind == "input_output" else "",
        "provenance": _provenance(rng, i, candidates, decision),
    }


def write_synthetic_run(
    folder: str | Path, records: int, *, rejects: int | None = None, seed: int = 0
) -> Path:
    """Write ``records.jsonl`` (and ``records.rejects.jsonl``, by default a quarter as many
    lines) into ``folder``; returns the records path.  Written with plain buffered writes
    (no fsync): this is test data, not a run."""
    rng = random.Random(seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            f.write(json.dumps(synthetic_record(rng, i), ensure_ascii=False) + "\n")
    with (out / "records.rejects.jsonl").open("w", encoding="utf-8") as f:
        for i in range(records // 4 if rejects is None else rejects):
            f.write(json.dumps(synthetic_reject(rng, i), ensure_ascii=False) + "\n")
    return path
