"""End to end on the embedded default: ``python -m ensemble_async generate`` with the two
local models (SmolLM2-135M-Instruct writes, the Gemma-3-270M base model answers with
in-context demos) makes a handful of real examples, and a second run
with the same cache makes the same records without calling a model.

Small targets and short generations keep it to a couple of minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ensemble_async.assemble import embedded_config

pytestmark = pytest.mark.slow

SEED = 42


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(tmp: Path) -> tuple[Path, list[str]]:
    """A TOML config made from the embedded default, sized for a quick CPU run."""
    try:
        cfg = embedded_config()
    except FileNotFoundError as exc:
        pytest.skip(f"embedded models not installed: {exc}")
    lines = [
        "[run]",
        'preset = "default"',
        f"seed = {SEED}",
        f"output = {_toml_string(str(tmp / 'run1' / 'records.jsonl'))}",
        f"cache_path = {_toml_string(str(tmp / 'cache.sqlite'))}",
        "targets = { input_output = 1, output = 1 }",
        "",
    ]
    for name, spec in cfg.backends.items():
        assert spec.model is not None
        lines += [
            f"[backends.{_toml_string(name)}]",
            f"kind = {_toml_string(spec.kind)}",
            f"model = {_toml_string(spec.model)}",
            *([f"gguf_file = {_toml_string(spec.gguf_file)}"] if spec.gguf_file else []),
            f"instruction_tuned = {'true' if spec.instruction_tuned else 'false'}",
            "concurrency = 2",
            "max_attempts = 2",
            "",
        ]
    answerers = ", ".join(_toml_string(a) for a in cfg.roles.answerers)
    lines += [
        "[roles]",
        f"writer = {_toml_string(cfg.roles.writer)}",
        f"answerers = [{answerers}]",
        "",
        "[overrides]",
        "max_attempts_factor = 5",
        "instruction_window = 1",
        "instance_concurrency = 2",
        "answer_concurrency = 2",
        "instruction_decoding = { max_new_tokens = 40 }",
        "instance_decoding = { max_new_tokens = 96 }",
        "answer_decoding = { max_new_tokens = 48 }",
        "",
    ]
    path = tmp / "embedded.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path, [cfg.roles.writer, *cfg.roles.answerers]


def generate(config: Path, log: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            *("-m", "ensemble_async", "generate", "--config", str(config)),
            *("--log-jsonl", str(log), *extra),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=420,
        check=False,
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _timeless(path: Path) -> list[dict[str, Any]]:
    """The lines without their write time (the one field a rerun may change)."""
    lines = _lines(path)
    for line in lines:
        line.get("provenance", {}).pop("created_at", None)
    return lines


def _summary(log: Path) -> dict[str, Any]:
    summaries = [r for r in _lines(log) if r["type"] == "summary"]
    assert len(summaries) == 1
    return summaries[0]


def test_embedded_default_makes_real_examples_and_reruns_from_the_cache(tmp_path: Path) -> None:
    config, answerers = write_config(tmp_path)
    smollm, gemma = answerers
    first = generate(config, tmp_path / "log1.jsonl")
    assert first.returncode == 0, first.stderr[-3000:]

    out1 = tmp_path / "run1"
    records = _lines(out1 / "records.jsonl")
    assert len(records) >= 1
    for rec in records:
        assert rec["id"].startswith("ei-")
        assert rec["instruction"] and rec["output"]
        cands = rec["provenance"]["candidates"]
        # candidate 0 is the writer's step-2 output, then Gemma's answer (one model,
        # one vote: the writer does not answer)
        assert [c["source"] for c in cands] == [smollm, gemma]
        assert [c["prompt_style"] for c in cands] == ["instance", "few_shot"]
        assert all(c["status"] in ("given", "ok") for c in cands)
        assert rec["provenance"]["decision"]["kept"] is True
        assert rec["provenance"]["seed"] == SEED
    # (with two candidates, consensus rarely rejects: this seed may reject nothing)
    rejects = _lines(out1 / "records.rejects.jsonl")
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rejects)
    summary1 = _summary(tmp_path / "log1.jsonl")
    misses1 = {b["name"]: b["cache_misses"] for b in summary1["backends"]}
    calls1 = {b["name"]: b["cache_misses"] + b["cache_hits"] for b in summary1["backends"]}
    assert misses1[smollm] > 0 and misses1[gemma] > 0  # real model calls were made

    # the same run into a fresh output with the same cache: no model is called and the
    # same records (and rejects) come out
    second = generate(
        config, tmp_path / "log2.jsonl", "--output", str(tmp_path / "run2" / "records.jsonl")
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary2 = _summary(tmp_path / "log2.jsonl")
    for row in summary2["backends"]:
        assert row["cache_misses"] == 0, row
        assert row["cache_hits"] == calls1[row["name"]]
    out2 = tmp_path / "run2"
    assert _timeless(out2 / "records.jsonl") == _timeless(out1 / "records.jsonl")
    assert sorted(_timeless(out2 / "records.rejects.jsonl"), key=json.dumps) == sorted(
        _timeless(out1 / "records.rejects.jsonl"), key=json.dumps
    )
