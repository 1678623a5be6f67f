"""``show``: which records it picks, what it prints of each, and its errors."""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from ensemble_async import cli
from ensemble_async.records import RecordWriter
from ensemble_async.show import add_show_parser, pick, run_show
from ensemble_async.testing.synthetic import synthetic_record, synthetic_reject


@pytest.fixture
def run(tmp_path: Path) -> Path:
    rng = random.Random(5)
    path = tmp_path / "run" / "records.jsonl"
    with RecordWriter(path) as w:
        for i in range(40):
            w.write(synthetic_record(rng, i))
        for i in range(30):
            w.reject(synthetic_reject(rng, i))
    return path


def show(target: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=False, color_system=None)
    parser = argparse.ArgumentParser()
    show_parser = add_show_parser(parser.add_subparsers(dest="command"))
    return run_show(show_parser.parse_args([str(target), *extra]), console), out.getvalue()


def test_first_n_records_with_candidates_and_decision(run: Path) -> None:
    records = [json.loads(line) for line in run.read_text().splitlines()]
    code, text = show(run, "-n", "3")
    assert code == 0
    for record in records[:3]:
        assert record["id"] in text
        assert record["instruction"][:30] in text
        decision = record["provenance"]["decision"]
        assert f"rule {decision['rule']}" in text
        kept = record["provenance"]["candidates"][decision["index"]]
        assert f"{kept['status']} (kept)" in text
    assert records[3]["id"] not in text
    assert text.count("(kept)") == 3
    assert "3 records from" in text


def test_seeded_sample_is_reproducible_and_uniform(run: Path) -> None:
    _, a = show(run.parent, "-n", "4", "--seed", "1")
    _, b = show(run.parent, "-n", "4", "--seed", "1")
    _, first = show(run.parent, "-n", "4")
    assert a == b and a != first
    items = [{"id": str(i)} for i in range(1000)]
    hits = sum(int(x["id"]) < 500 for s in range(200) for x in pick(iter(items), 5, s))
    assert 400 < hits < 600  # half of 1000 draws from the lower half, give or take
    assert [x["id"] for x in pick(iter(items), 3, 9)] == sorted(
        (x["id"] for x in pick(iter(items), 3, 9)), key=int
    )  # shown in file order


def test_rejects_with_their_meaning(run: Path) -> None:
    code, text = show(run, "-n", "30", "--rejects")
    assert code == 0
    assert "30 rejects from" in text
    assert "consensus: below-threshold" in text and "lowest pairwise" in text
    assert "the models disagree" in text  # the catalogued meaning
    assert "instances: " in text and "instructions: " in text


def test_markup_in_records_is_printed_as_text(tmp_path: Path) -> None:
    record = synthetic_record(random.Random(1), 0)
    record["instruction"] = "Explain [bold red]this[/bold red] markup."
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        w.write(record)
    _, text = show(path)
    assert "[bold red]this[/bold red]" in text


def test_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert cli.main(["show", str(run), "-n", "0"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n[1]\n{"id": "b"}\n')
    assert cli.main(["show", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    lone = tmp_path / "lone" / "records.jsonl"
    lone.parent.mkdir()
    lone.write_text("")
    assert cli.main(["show", str(lone), "--rejects"]) == 2
    assert "no rejects file" in capsys.readouterr().err
