"""The dataset card (README.md) written with a Hub-format export.

It says what made the data (ensemble-async, the Ensemble-Instruct method, the preset and
seed), which models took part and under which licences (as the run's log, summary.json
or the exporter's ``--model-license`` give them; the embedded models' licences are
known), the counts, the report's key figures and how to load the data.  Input is the
report dict of :func:`ensemble_async.report.build_report`; output is Markdown text with
the Hub's YAML header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import __version__

__all__ = ["dataset_card", "member_licenses"]


def member_licenses(
    report: Mapping[str, Any], given: Mapping[str, str] | None = None
) -> dict[str, dict[str, str | None]]:
    """For each backend that gave candidates: its model and licence (None when unknown)."""
    from .models import embedded_models

    known = {b["name"]: b for b in report.get("run_backends", []) if "name" in b}
    names = [r["member"].removesuffix(" (step 2)") for r in report["members"]["rows"]]
    out: dict[str, dict[str, str | None]] = {}
    for name in dict.fromkeys(names):
        info = known.get(name, {})
        models = [m for r in report["members"]["rows"] for m in r["models"] if r["member"] == name]
        model = info.get("model") or (models[0] if models else None)
        license_ = (given or {}).get(name) or info.get("license")
        if license_ is None:
            for m in embedded_models():
                haystack = f"{name} {model or ''}".lower()
                if m.key in haystack or m.package in haystack:
                    license_ = m.license
        out[name] = {"model": model, "kind": info.get("kind"), "license": license_}
    return out


def _yaml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def dataset_card(
    report: Mapping[str, Any],
    counts: Mapping[str, int],
    *,
    license: str = "other",
    model_licenses: Mapping[str, str] | None = None,
    repo: str | None = None,
    system_prompt: str | None = None,
) -> str:
    """The README.md of an exported dataset."""
    members = member_licenses(report, model_licenses)
    funnel = {f["stage"]: f["count"] for f in report["funnel"]}
    preset = ", ".join(report["preset"]) or "unknown"
    seed = ", ".join(str(s) for s in report["run_seed"]) or "unknown"
    head = [
        "---",
        f"license: {_yaml_str(license)}",
        "task_categories:",
        "- text-generation",
        "tags:",
        "- synthetic",
        "- ensemble-instruct",
        "- ensemble-async",
        "size_categories:",
        f"- {_size(counts.get('train', 0))}",
        "---",
        "",
        "# Synthetic instruction data (Ensemble-Instruct)",
        "",
        f"Made with ensemble-async {__version__}: several language models wrote instructions "
        "and their inputs, answered them, and only answers the models agreed on were kept "
        "(the Ensemble-Instruct method). Every row keeps its provenance: the candidates each "
        "model gave and the consensus decision.",
        "",
        f"- preset: `{preset}`; run seed: `{seed}`",
        "- splits: " + ", ".join(f"`{name}` ({n} rows)" for name, n in counts.items()),
    ]
    if system_prompt is not None:
        head.append(f"- system prompt in `messages`: {_yaml_str(system_prompt)}")
    lines = [*head, "", "## Models", "", "| member | kind | model | licence |", "|---|---|---|---|"]
    for name, info in members.items():
        lines.append(
            f"| {name} | {info['kind'] or '-'} | {info['model'] or '-'} | "
            f"{info['license'] or 'not given: check the model card'} |"
        )
    lines += [
        "",
        "Outputs of these models may carry the terms of their licences; check them before "
        "you use or share this data.",
        "",
        "## Key figures",
        "",
        "| step | count |",
        "|---|---:|",
        *(f"| {stage} | {n} |" for stage, n in funnel.items()),
        "",
        "| consensus outcome | rule | count |",
        "|---|---|---:|",
        *(f"| {r['outcome']} | {r['rule']} | {r['count']} |" for r in report["consensus"]["rules"]),
        "",
        "| member | candidates given | failures | win rate |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['member']} | {r['given']} | {r['failures']} | "
            + ("-" if r["win_rate"] is None else f"{100 * r['win_rate']:.1f}%")
            + " |"
            for r in report["members"]["rows"]
        ),
        "",
        "## Columns",
        "",
        "`train`: `id`, `type` (`input_output` or `output`), `instruction`, `input`, `output`, "
        "`messages` (user and assistant turns), provenance scalars (`writer`, `preset`, "
        "`seed`, `instruction_attempt`, `instruction_index`, `novelty_max_rouge`, "
        "`decision_rule`, `kept_candidate`, `min_pairwise`), and JSON text: `candidates`, "
        "`decision`, `provenance_extra`, `extra` "
        "(`ensemble_async.export.record_from_row(row)` rebuilds the original record).",
    ]
    if "rejects" in counts:
        lines.append(
            "`rejects`: `id`, `stage`, `reason`, `type`, `instruction`, `input`, `text`, "
            "`detail` (JSON: everything else, the candidates of a consensus reject included)."
        )
    lines += ["", "## Load it", ""]
    if repo and "rejects" in counts:
        lines += [
            "On the Hub the records are config `default` and the rejects config `rejects` "
            "(a config holds one set of columns); each has one split, `train`.",
            "",
        ]
    lines.append("```python")
    if repo:
        lines += [
            "from datasets import load_dataset",
            "",
            f'train = load_dataset("{repo}", split="train")',
            *(
                [f'rejects = load_dataset("{repo}", "rejects", split="train")']
                if "rejects" in counts
                else []
            ),
            'print(train[0]["messages"])',
        ]
    else:
        lines += [
            "from datasets import load_from_disk",
            "",
            'ds = load_from_disk("path/to/this/folder")',
            'print(ds["train"][0]["messages"])',
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def _size(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M" if n < 1_000_000 else "1M<n<10M"
