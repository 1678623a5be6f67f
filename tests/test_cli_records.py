"""``generate`` and its output files: distinct exit codes for outputs it must refuse,
the run manifest, the deferred exit code and summary.json."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from served import Server
from test_cli_generate import config_text, read_jsonl, servers, write_config

from ensemble_async import cli
from ensemble_async.manifest import changed_fields, fingerprint
from ensemble_async.records import RecordWriter

__all__ = ["servers"]  # the module-scoped fixture of the doubles, shared


def _generate(cfg: Path, *extra: str) -> int:
    return cli.main(["generate", "--config", str(cfg), "--quiet", *extra])


def test_summary_json_and_manifest_beside_the_records(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out))
    assert _generate(cfg) == cli.EXIT_OK
    summary = json.loads(out.with_name("records.summary.json").read_text())
    records = read_jsonl(out)
    assert summary["records_written"] == len(records) > 0 and summary["deferred"] == 0
    manifest = json.loads(out.with_name("records.manifest.json").read_text())
    assert manifest["seed"] == 3
    assert manifest["members"]["writer"] == {
        "kind": "tgi",
        "model": "double/tgi-model",
        "instruction_tuned": True,
    }
    assert all(r["provenance"]["fingerprint"] == manifest["fingerprint"] for r in records)
    assert {c["backend"] for c in records[0]["provenance"]["candidates"]} == {"tgi", "openai"}


def test_a_rerun_with_another_seed_exits_2_naming_it_and_writes_nothing(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out))
    assert _generate(cfg) == cli.EXIT_OK
    before = {p.name: p.read_bytes() for p in out.parent.iterdir() if "cache" not in p.name}
    capsys.readouterr()
    text = config_text(*servers, out).replace("seed = 3", "seed = 7")
    text = text.replace("{ input_output = 8", "{ input_output = 20")  # targets may change
    write_config(cfg, text + "\n[overrides]\nnovelty_threshold = 0.5\n")
    assert _generate(cfg) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "seed: 3 -> 7" in err and "settings.novelty_threshold: 0.7 -> 0.5" in err
    assert "targets" not in err
    after = {p.name: p.read_bytes() for p in out.parent.iterdir() if "cache" not in p.name}
    assert after == before
    # more concurrency and bigger targets are the same dataset: it continues
    write_config(
        cfg, config_text(*servers, out, io_n=12).replace("concurrency = 8", "concurrency = 16")
    )
    assert _generate(cfg) == cli.EXIT_OK
    assert len(read_jsonl(out)) > before["records.jsonl"].count(b"\n")


def test_a_rerun_that_changes_an_answerers_prompt_style_exits_2_naming_it(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``instruction_tuned = false`` gives an answerer few-shot prompts instead of the
    zero-shot ones: other answers, so another dataset, refused before anything is written."""
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out, io_n=2, o_n=1))
    assert _generate(cfg) == cli.EXIT_OK
    before = {p.name: p.read_bytes() for p in out.parent.iterdir() if "cache" not in p.name}
    capsys.readouterr()
    text = config_text(*servers, out, io_n=4, o_n=2).replace(
        'kind = "openai"', 'kind = "openai"\ninstruction_tuned = false'
    )
    write_config(cfg, text)
    assert _generate(cfg) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "members.answerer.instruction_tuned: true -> false" in err
    after = {p.name: p.read_bytes() for p in out.parent.iterdir() if "cache" not in p.name}
    assert after == before


def test_a_manifest_written_before_prompt_styles_were_recorded_still_matches() -> None:
    member: dict[str, Any] = {"kind": "tgi", "model": "m"}
    old = {"seed": 1, "members": {"a": member}}
    new = {"seed": 1, "members": {"a": {**member, "instruction_tuned": False}}}
    assert changed_fields(old, new) == []
    assert changed_fields({**old, "seed": 2}, new) == ["seed: 2 -> 1"]
    tuned = {"seed": 1, "members": {"a": {**member, "instruction_tuned": True}}}
    assert changed_fields(tuned, new) == ["members.a.instruction_tuned: true -> false"]


def test_a_rerun_an_older_manifest_still_matches_keeps_the_datasets_fingerprint(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    """A manifest that lacks a field recorded since (or holds a model id that could not be
    read) still matches; the records the rerun adds carry the fingerprint the dataset was
    begun with, so every record of one dataset names the manifest beside it."""
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out, io_n=2, o_n=1))
    assert _generate(cfg) == cli.EXIT_OK
    path = out.with_name("records.manifest.json")
    older = json.loads(path.read_text())
    begun_with = older["fingerprint"]
    for member in older["members"].values():
        del member["instruction_tuned"]
    older["fingerprint"] = fingerprint(older)
    path.write_text(json.dumps(older))
    for written in (out, out.with_name("records.rejects.jsonl")):  # as that run wrote them
        written.write_text(written.read_text().replace(begun_with, older["fingerprint"]))
    write_config(cfg, config_text(*servers, out, io_n=4, o_n=2))
    assert _generate(cfg) == cli.EXIT_OK
    records = read_jsonl(out)
    assert len(records) > 2
    assert {r["provenance"]["fingerprint"] for r in records} == {older["fingerprint"]}
    assert json.loads(path.read_text())["fingerprint"] == older["fingerprint"]


def test_outputs_that_are_not_records_files_exit_7_untouched(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("my notes\n")
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, note))
    assert _generate(cfg) == cli.EXIT_NOT_RECORDS
    assert "not a records file" in capsys.readouterr().err
    assert note.read_text() == "my notes\n" and not note.with_name("note.txt.torn").exists()

    device = tmp_path / "full"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a copy of /dev/full
    write_config(cfg, config_text(*servers, device))
    assert _generate(cfg) == cli.EXIT_NOT_RECORDS
    assert "character device" in capsys.readouterr().err

    # rejects pointed at the response cache: the sqlite file is refused, not truncated
    out = tmp_path / "out" / "records.jsonl"
    cache = tmp_path / "out" / "cache.sqlite"
    text = config_text(*servers, out).replace(
        "seed = 3", f'seed = 3\nrejects = "{cache}"\ncache_path = "{cache}"'
    )
    write_config(cfg, text)
    assert _generate(cfg) == cli.EXIT_USAGE  # two outputs of one run in one file
    assert "same file" in capsys.readouterr().err
    # rejects pointed at some other sqlite database: not a records file, left intact
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    write_config(
        cfg, config_text(*servers, out).replace("seed = 3", f'seed = 3\nrejects = "{other}"')
    )
    assert _generate(cfg) == cli.EXIT_NOT_RECORDS
    with sqlite3.connect(other) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]


def test_locked_and_corrupt_outputs_have_their_own_exit_codes(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out))
    with RecordWriter(out, rejects_path=tmp_path / "other.jsonl"):
        assert _generate(cfg) == cli.EXIT_OUTPUT_LOCKED
    assert "another run" in capsys.readouterr().err
    out.write_text('{"id": "a"}\n{broken\n{"id": "b"}\n')
    assert _generate(cfg) == cli.EXIT_CORRUPT_RECORDS
    assert "records.jsonl:2" in capsys.readouterr().err


def test_an_unavailable_answerer_exits_5_then_the_same_command_finishes(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    # An answerer that serves the start-up probe, then fails half its requests (seeded):
    # with one attempt each, the items it fails on are deferred, not rejected.
    flaky = Server("openai", "--ei", "answer-lm", "--fault-rate", "0.5", "--fault-after", "1")
    try:
        down = config_text(servers[0], flaky.url, out).replace(
            "concurrency = 8", "concurrency = 8\nmax_attempts = 1"
        )
        cfg = write_config(tmp_path / "cfg.toml", down)
        assert _generate(cfg) == cli.EXIT_DEFERRED
    finally:
        flaky.stop()
    assert "deferred" in capsys.readouterr().err
    summary = json.loads(out.with_name("records.summary.json").read_text())
    assert summary["deferred"] > 0
    first_written = summary["records_written"]
    assert len(read_jsonl(out.with_name("records.deferred.jsonl"))) == summary["deferred"]
    write_config(cfg, config_text(*servers, out))
    assert _generate(cfg) == cli.EXIT_OK
    summary = json.loads(out.with_name("records.summary.json").read_text())
    assert summary["deferred"] == 0 and summary["deferred_before"] > 0
    assert summary["records_written"] > 0
    assert len(read_jsonl(out)) == first_written + summary["records_written"]
    assert not out.with_name("records.deferred.jsonl").exists()
