"""The generate, check, consensus and export subcommands, end to end.

The servers are the HTTP test doubles answering like Ensemble-Instruct LMs, each in a
subprocess (``python -m ensemble_async.testing.serve``); ``generate`` runs as a real
``python -m ensemble_async`` process where a kill is involved.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from served import Server

from ensemble_async import cli

pytest.importorskip("ensemble_async.pipeline")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CASES = SHARED / "reference" / "ensemble-instruct" / "consensus_cases.jsonl"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    tgi = Server("tgi", "--ei", "writer-lm", "--latency", "0.002")
    oai = Server("openai", "--ei", "answer-lm", "--latency", "0.002")
    try:
        yield tgi.url, oai.url
    finally:
        tgi.stop()
        oai.stop()


def config_text(
    tgi: str, oai: str, out: Path, *, io_n: int = 8, o_n: int = 4, extra: str = ""
) -> str:
    return textwrap.dedent(
        f"""
        [run]
        seed = 3
        output = "{out}"
        targets = {{ input_output = {io_n}, output = {o_n} }}

        [backends.writer]
        kind = "tgi"
        url = "{tgi}"
        concurrency = 8

        [backends.answerer]
        kind = "openai"
        url = "{oai}"
        concurrency = 8

        [roles]
        writer = "writer"
        answerers = ["answerer"]
        """
    ) + textwrap.dedent(extra)


GENERATE = [sys.executable, "-m", "ensemble_async", "generate", "--config", "cfg.toml"]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must be valid JSON


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ensemble_async", *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_generate_writes_records_rejects_and_a_jsonl_log(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out))
    log = tmp_path / "log.jsonl"
    code = cli.main(["generate", "--config", str(cfg), "--log-jsonl", str(log)])
    assert code == cli.EXIT_OK
    records = read_jsonl(out)
    assert records, "no records"
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for r in records:
        assert r["id"].startswith("ei-") and r["instruction"] and r["output"]
        assert r["provenance"]["candidates"][0]["source"] == "writer"
    rejects = read_jsonl(out.with_name("records.rejects.jsonl"))
    assert all(r["reason"] for r in rejects)
    lines = read_jsonl(log)
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "summary"
    accepted = [x for x in lines if x["type"] == "event" and x["kind"] == "accepted"]
    assert sum(x["stage"] == "consensus" for x in accepted) == len(records)
    assert lines[-1]["pipeline"]["records_written"] == len(records)
    assert {b["name"] for b in lines[-1]["backends"]} == {"writer", "answerer"}

    # export both formats
    alpaca = tmp_path / "alpaca.json"
    chat = tmp_path / "chat.jsonl"
    assert cli.main(["export", "--format", "alpaca", str(out), str(alpaca)]) == 0
    assert cli.main(["export", "--format", "chat", str(out), str(chat)]) == 0
    examples = json.loads(alpaca.read_text())
    assert [e["output"] for e in examples] == [r["output"] for r in records]
    chats = read_jsonl(chat)
    assert len(chats) == len(records)
    assert chats[0]["messages"][1] == {"role": "assistant", "content": records[0]["output"]}

    # a second run repeats nothing: the records are there, the cache answers
    log2 = tmp_path / "log2.jsonl"
    assert cli.main(["generate", "--config", str(cfg), "--log-jsonl", str(log2)]) == 0
    assert read_jsonl(out) == records
    summary = read_jsonl(log2)[-1]
    assert summary["pipeline"]["records_written"] == 0
    assert summary["pipeline"]["records_present"] == len(records)


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    # the uninterrupted run
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    write_config(
        full_dir / "cfg.toml", config_text(*servers, Path("out/records.jsonl"), io_n=40, o_n=20)
    )
    done = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=full_dir)
    assert done.returncode == 0, done.stderr
    expected = read_jsonl(full_dir / "out" / "records.jsonl")
    assert len(expected) > 20

    # the same run, killed with SIGKILL once a few records are on disk
    work = tmp_path / "killed"
    work.mkdir()
    write_config(
        work / "cfg.toml", config_text(*servers, Path("out/records.jsonl"), io_n=40, o_n=20)
    )
    argv = [sys.executable, "-m", "ensemble_async", "generate", "--config", "cfg.toml"]
    proc = subprocess.Popen(
        [*argv, "--log-jsonl", "-"], cwd=work, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    written = 0
    try:
        for line in proc.stderr:  # a record is on disk before its event is logged
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("stage") == "consensus" and event.get("kind") == "accepted":
                written += 1
                if written == 5:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        if proc.poll() is None and written < 5:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()
    assert written == 5 and proc.returncode == -signal.SIGKILL
    partial = (work / "out" / "records.jsonl").read_bytes()
    partial_count = partial.count(b"\n")
    assert 5 <= partial_count < len(expected)

    # restart the same command
    again = run_cli("generate", "--config", "cfg.toml", "--log-jsonl", "log.jsonl", cwd=work)
    assert again.returncode == 0, again.stderr
    resumed = read_jsonl(work / "out" / "records.jsonl")
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert set(ids) == {r["id"] for r in expected}
    key = lambda r: (r["id"], r["instruction"], r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, expected))
    log = read_jsonl(work / "log.jsonl")
    assert log[0]["existing_records"] >= 5
    assert log[-1]["pipeline"]["records_present"] >= 5
    # the cache database survived the kill and is readable
    with sqlite3.connect(work / "out" / "records.cache.sqlite") as db:
        (rows,) = db.execute("SELECT count(*) FROM responses").fetchone()
        (check,) = db.execute("PRAGMA integrity_check").fetchone()
    assert rows > 0 and check == "ok"


def test_sigint_exits_130_and_keeps_the_records(servers: tuple[str, str], tmp_path: Path) -> None:
    write_config(
        tmp_path / "cfg.toml", config_text(*servers, Path("out/records.jsonl"), io_n=40, o_n=20)
    )
    proc = subprocess.Popen(
        [*GENERATE, "--log-jsonl", "-"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if '"stage": "consensus", "kind": "accepted"' in line:
            proc.send_signal(signal.SIGINT)
            interrupted_at = time.monotonic()
            break
    lines.extend(proc.stderr)
    proc.wait(60)
    took = time.monotonic() - interrupted_at
    proc.stderr.close()
    assert proc.returncode == cli.EXIT_INTERRUPTED, "".join(lines)[-2000:]
    assert took < 5, f"SIGINT took {took:.1f} s to end the run (the guarantee is 5 s)"
    summaries = [json.loads(x) for x in lines if x.startswith('{"type": "summary"')]
    assert summaries and summaries[-1]["status"] == "interrupted"
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert records and len({r["id"] for r in records}) == len(records)

    # The same command resumes it: it finishes, keeping every record already written.
    rerun = subprocess.run(
        GENERATE, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert rerun.returncode == cli.EXIT_OK, rerun.stderr[-2000:]
    after = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert after[: len(records)] == records and len(after) > len(records)
    assert len({r["id"] for r in after}) == len(after)


WRITER = '[backends.writer]\nkind = "tgi"\nurl = "http://127.0.0.1:9"\n'
WRITER += '[backends.ans]\nkind = "openai"\nurl = "http://127.0.0.1:9"\n'
ROLES = '[roles]\nwriter = "writer"\nanswerers = ["ans"]\n'
BAD = [
    ('[run]\npreset = "turbo"\n' + WRITER + ROLES, "run.preset", "unknown preset"),
    (
        '[backends.writer]\nkind = "nosuch"\n[backends.ans]\nkind = "tgi"\nurl = "http://h"\n'
        + ROLES,
        "backends.writer.kind",
        "unknown backend kind",
    ),
    (
        WRITER + '[backends.x]\nkind = "tgi"\nurl = "gopher://h"\n' + ROLES,
        "backends.x.url",
        "http or https",
    ),
    (
        WRITER + '[backends.x]\nkind = "tgi"\nurl = "http://h"\napi_key = "k"\n' + ROLES,
        "backends.x.api_key",
        "api_key_env",
    ),
    (
        WRITER + '[backends.x]\nkind = "tgi"\nurl = "http://h"\nmax_attempts = 0\n' + ROLES,
        "backends.x.max_attempts",
        "must be >= 1",
    ),
    (
        WRITER + '[backends.x]\nkind = "tgi"\nurl = "http://h"\napi_key_env = "EA_NOT_SET_VAR"\n'
        '[roles]\nwriter = "x"\nanswerers = ["ans"]\n',
        "backends.x.api_key_env",
        "EA_NOT_SET_VAR is not set",
    ),
    (WRITER + '[roles]\nwriter = "ghost"\nanswerers = ["ans"]\n', "roles.writer", "'ghost'"),
    (WRITER + ROLES + "[overrides]\nnovelty = 1\n", "overrides.novelty", "unknown"),
]


@pytest.mark.parametrize(("text", "key", "needle"), BAD)
def test_bad_config_exits_2_and_names_the_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    key: str,
    needle: str,
) -> None:
    monkeypatch.delenv("EA_NOT_SET_VAR", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # the default output would go here
    cfg = write_config(tmp_path / "bad.toml", text)
    assert cli.main(["generate", "--config", str(cfg)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "bad.toml" in err and key in err and needle in err
    assert list(work.iterdir()) == []  # refused before anything was created


def test_unwritable_output_exits_4(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    cfg = write_config(
        tmp_path / "cfg.toml", config_text(*servers, tmp_path / "blocker" / "records.jsonl")
    )
    assert cli.main(["generate", "--config", str(cfg)]) == cli.EXIT_OUTPUT
    assert "run.output" in capsys.readouterr().err


def test_check_reports_live_backends(
    servers: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the table's cells are not cut short
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, tmp_path / "r.jsonl"))
    assert cli.main(["check", "--config", str(cfg)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "writer" in out and "answerer" in out and "ok" in out
    assert "double/tgi-model" in out and "double-model" in out


def test_check_exits_3_when_a_backend_is_unreachable(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config_text(servers[0], "http://127.0.0.1:9", tmp_path / "r.jsonl")
    cfg = write_config(tmp_path / "cfg.toml", text)
    assert cli.main(["check", "--config", str(cfg), "--timeout", "5"]) == cli.EXIT_BACKENDS_FAILED
    out = " ".join(capsys.readouterr().out.split())
    assert "unreachable: answerer" in out


def test_consensus_reproduces_the_reference_cases(tmp_path: Path) -> None:
    if not CASES.is_file():
        pytest.skip("../shared/reference is not present")
    out = tmp_path / "decided.jsonl"
    assert cli.main(["consensus", str(CASES), "--out", str(out)]) == cli.EXIT_OK
    cases = read_jsonl(CASES)
    decided = read_jsonl(out)
    assert len(decided) == len(cases) == 153
    for case, line in zip(cases, decided, strict=True):
        assert line["candidates"] == case["candidates"]
        assert line["selection"]["index"] == case["expected_index"]
        if case["expected_index"] is not None:
            assert line["selection"]["text"] == case["candidates"][case["expected_index"]].strip()
    assert sum(line["selection"]["kept"] for line in decided) == 104


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"candidates": ["a", "b"]}\nnot json\n', ":2: not JSON"),
        ('{"candidates": ["a", 3]}\n', ":1: 'candidates' must be a list of strings"),
        ("\n[1, 2]\n", ":2: expected a JSON object"),
    ],
)
def test_consensus_bad_lines_name_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    assert cli.main(["consensus", str(path)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert f"in.jsonl{needle}" in err


def test_consensus_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "candidates": ["Paris", "paris.", "Rome"]}\n')
    assert cli.main(["consensus", str(path)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["id"] == 1
    assert line["selection"]["rule"] == "shortcut-first" and line["selection"]["text"] == "Paris"


def test_export_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["export", "--format", "chat", str(tmp_path / "nope.jsonl"), "x.jsonl"])
    assert code == cli.EXIT_USAGE
    assert "nope.jsonl" in capsys.readouterr().err


def test_serve_module_stops_on_sigterm() -> None:
    server = Server("openai", "--ei", "x")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert server.proc.stdout is not None
    server.proc.stdout.close()


def test_generate_exits_3_when_no_backend_can_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config_text("http://127.0.0.1:9", "http://127.0.0.1:9", tmp_path / "r.jsonl")
    text = text.replace("concurrency = 8", "concurrency = 8\nmax_attempts = 1")
    cfg = write_config(tmp_path / "cfg.toml", text)
    out = tmp_path / "elsewhere" / "data.jsonl"
    code = cli.main(["generate", "--config", str(cfg), "--quiet", "--output", str(out)])
    assert code == cli.EXIT_BACKENDS_FAILED
    err = " ".join(capsys.readouterr().err.split())
    assert "member writer" in err and "member answerer" in err and "cannot serve" in err
    assert "Traceback" not in err
    # the probe stopped it before any file was created
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "r.jsonl").exists()


def test_bad_seed_line_exits_2_naming_file_and_line(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seeds = tmp_path / "my_seeds.jsonl"
    good = {
        "id": "s1",
        "name": "n",
        "instruction": "Add the two numbers given.",
        "instances": [{"input": "2 and 3", "output": "5"}],
        "is_classification": False,
    }
    seeds.write_text(json.dumps(good) + "\n" + '{"id": "s2", "instruction": \n')
    out = tmp_path / "out" / "records.jsonl"
    text = config_text(*servers, out).replace("seed = 3", f'seed = 3\nseeds = "{seeds}"')
    cfg = write_config(tmp_path / "cfg.toml", text)
    assert cli.main(["generate", "--config", str(cfg)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "my_seeds.jsonl:2" in err
    assert not out.exists()
