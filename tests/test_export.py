"""export_alpaca / export_chat: formats, atomic replacement, errors, datasets loading."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ensemble_async.export import ExportError, export_alpaca, export_chat
from ensemble_async.records import RecordWriter

RECORDS: list[dict[str, Any]] = [
    {
        "id": "ei-1",
        "type": "with_input",
        "instruction": "Sort the numbers.",
        "input": "3, 1, 2",
        "output": "1, 2, 3",
        "provenance": {"candidates": [{"backend": "a", "text": "1, 2, 3"}]},
    },
    {"id": "ei-2", "instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"id": "ei-3", "instruction": 'Say "hé"\nplease.', "input": None, "output": "hé\n|EoS|"},
]


@pytest.fixture
def records(tmp_path: Path) -> Path:
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        for r in RECORDS:
            w.write(r)
    # A torn tail from a killed run: exports skip it.
    with path.open("ab") as f:
        f.write(b'{"id": "ei-4", "instruction": "cut')
    return path


def test_alpaca_export(records: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "alpaca.json"
    assert export_alpaca(records, out) == 3
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == [
        {"instruction": r["instruction"], "input": r["input"] or "", "output": r["output"]}
        for r in RECORDS
    ]
    assert [sorted(item) for item in data] == [["input", "instruction", "output"]] * 3


def test_chat_export(records: Path, tmp_path: Path) -> None:
    out = tmp_path / "chat.jsonl"
    assert export_chat(records, out) == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3
    users = [row["messages"][0] for row in rows]
    assert users[0] == {"role": "user", "content": "Sort the numbers.\n\n3, 1, 2"}
    assert users[1] == {"role": "user", "content": "Name a colour."}
    assert users[2]["content"] == RECORDS[2]["instruction"]
    assert [row["messages"][1] for row in rows] == [
        {"role": "assistant", "content": r["output"]} for r in RECORDS
    ]


def test_export_replaces_atomically_and_leaves_no_temp(records: Path, tmp_path: Path) -> None:
    out = tmp_path / "alpaca.json"
    out.write_text("old content")
    export_alpaca(records, out)
    assert json.loads(out.read_text())[0]["output"] == "1, 2, 3"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".alpaca.json.")]
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)


def test_failed_export_keeps_the_old_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"id": "a", "instruction": "i", "output": "o"})
        + "\n"
        + json.dumps({"id": "b", "instruction": "i"})
        + "\n"
    )
    out = tmp_path / "chat.jsonl"
    out.write_text("previous export\n")
    with pytest.raises(ExportError, match=r"bad\.jsonl: record b"):
        export_chat(bad, out)
    assert out.read_text() == "previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "chat.jsonl"]


def test_export_errors_are_clear(records: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"missing\.jsonl"):
        export_alpaca(tmp_path / "missing.jsonl", tmp_path / "a.json")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"id": "a", "instruction": "i", "output": "o"}\n{oops\n{"id": "b"}\n')
    with pytest.raises(ExportError, match=r"corrupt\.jsonl:2"):
        export_chat(corrupt, tmp_path / "c.jsonl")
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="somefile"):
        export_alpaca(records, blocker / "a.json")
    with pytest.raises(ExportError, match="onto itself"):
        export_chat(records, records)
    input_bad = tmp_path / "input.jsonl"
    input_bad.write_text('{"id": "z", "instruction": "i", "input": 3, "output": "o"}\n')
    with pytest.raises(ExportError, match="non-string input"):
        export_alpaca(input_bad, tmp_path / "z.json")


def test_empty_records_export_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert export_alpaca(empty, tmp_path / "a.json") == 0
    assert json.loads((tmp_path / "a.json").read_text()) == []
    assert export_chat(empty, tmp_path / "c.jsonl") == 0
    assert (tmp_path / "c.jsonl").read_text() == ""


def test_datasets_loads_both_exports(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets")
    alpaca, chat = tmp_path / "alpaca.json", tmp_path / "chat.jsonl"
    export_alpaca(records, alpaca)
    export_chat(records, chat)
    cache = str(tmp_path / "hf" / "datasets")
    a = datasets.load_dataset("json", data_files=str(alpaca), split="train", cache_dir=cache)
    c = datasets.load_dataset("json", data_files=str(chat), split="train", cache_dir=cache)
    assert a.num_rows == c.num_rows == 3
    assert sorted(a.column_names) == ["input", "instruction", "output"]
    assert a[0]["output"] == "1, 2, 3"
    assert a[2]["instruction"] == RECORDS[2]["instruction"]
    assert c.column_names == ["messages"]
    assert c[0]["messages"][1] == {"role": "assistant", "content": "1, 2, 3"}
    assert os.path.isdir(cache)
