"""Command-line odds and ends: bad option values exit 2 with a clear message and create
nothing, ``generate --limit``, consensus input edge cases, and SIGTERM exiting 130 from
every subcommand with no traceback and no temporary file left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_generate import config_text, read_jsonl, servers, write_config

from ensemble_async import cli

__all__ = ["servers"]


@pytest.fixture
def clean_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def good_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "cfg.toml", config_text("http://127.0.0.1:9", "http://127.0.0.1:9", Path("r"))
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--output", ""], "--output: must not be empty"),
        (["--output", "somedir/"], "names a folder"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_generate_bad_options_exit_2_and_create_nothing(
    tmp_path: Path,
    clean_cwd: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    needle: str,
) -> None:
    cfg = good_config(tmp_path)
    assert cli.main(["generate", "--config", str(cfg), *extra]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err
    assert list(clean_cwd.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ask", "x", "--member", "tgi=http://h", "--attempts", "0"], "--attempts must be >= 1"),
        (["ask", "x", "--member", "tgi=http://h", "--timeout", "nan"], "--timeout"),
        (["check", "--config", "CFG", "--timeout", "0"], "--timeout must be a number > 0"),
        (["check", "--config", "CFG", "--timeout", "nan"], "--timeout must be a number > 0"),
        (["check", "--config", "CFG", "--timeout", "-1"], "--timeout must be a number > 0"),
        (["consensus", "IN", "--threshold", "nan"], "--threshold must be a finite number"),
        (["consensus", "IN", "--threshold", "inf"], "--threshold must be a finite number"),
    ],
)
def test_bad_numbers_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    cfg = good_config(tmp_path)
    given = tmp_path / "in.jsonl"
    given.write_text('{"candidates": ["a"]}\n')
    argv = [str(cfg) if a == "CFG" else str(given) if a == "IN" else a for a in argv]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err


def test_generate_limit_caps_the_targets(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", config_text(*servers, out, io_n=8, o_n=4))
    log = tmp_path / "log.jsonl"
    code = cli.main(["generate", "--config", str(cfg), "--limit", "2", "--log-jsonl", str(log)])
    assert code == cli.EXIT_OK
    summary = read_jsonl(log)[-1]["pipeline"]
    assert sum(summary["accepted_instructions"].values()) <= 2
    assert 1 <= len(read_jsonl(out)) <= 2
    assert "input_output = 8" in cfg.read_text()  # the config is unchanged


def test_consensus_accepts_a_bom_and_names_a_bad_utf8_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "in.jsonl"
    given.write_bytes(b'\xef\xbb\xbf{"candidates": ["Paris", "Paris."]}\n')
    assert cli.main(["consensus", str(given)]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["selection"]["text"] == "Paris"
    given.write_bytes(b'{"candidates": ["a"]}\n{"candidates": ["\xff"]}\n')
    assert cli.main(["consensus", str(given)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "in.jsonl:2: not valid UTF-8" in err


def test_consensus_bounds_the_candidates_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "in.jsonl"
    given.write_text(json.dumps({"candidates": ["a"] * (cli.MAX_CANDIDATES + 1)}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["consensus", str(given), "--out", str(out)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "in.jsonl:1:" in err and f"more than the {cli.MAX_CANDIDATES}" in err
    assert not out.exists()


def test_consensus_refuses_to_replace_a_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not Path("/dev/null").is_char_device():
        pytest.skip("no /dev/null here")
    given = tmp_path / "in.jsonl"
    given.write_text('{"candidates": ["a"]}\n')
    assert cli.main(["consensus", str(given), "--out", "/dev/null"]) == cli.EXIT_OUTPUT
    assert "not a regular file" in capsys.readouterr().err
    assert Path("/dev/null").is_char_device()


# ------------------------------------------------------------------------- SIGTERM


@pytest.fixture
def silent_server() -> Iterator[tuple[str, socket.socket]]:
    """A TCP listener that accepts and never answers: a command talking to it waits."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port = listener.getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", listener
    finally:
        listener.close()


def start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ensemble_async", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def terminate(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["ask", "check", "generate"])
def test_sigterm_exits_130_while_waiting_on_a_server(
    tmp_path: Path, silent_server: tuple[str, socket.socket], command: str
) -> None:
    url, listener = silent_server
    cfg = write_config(tmp_path / "cfg.toml", config_text(url, url, Path("out/records.jsonl")))
    argv = {
        "ask": ["ask", "x", "--member", f"tgi={url}"],
        "check": ["check", "--config", str(cfg)],
        "generate": ["generate", "--config", str(cfg), "--quiet"],
    }[command]
    proc = start(argv, tmp_path)
    try:
        conn, _ = listener.accept()  # the command is now waiting on the server
    except BaseException:
        proc.kill()
        raise
    try:
        terminate(proc)
    finally:
        conn.close()
    assert not (tmp_path / "out").exists()  # generate stopped in its probe


def test_sigterm_exits_130_from_consensus(tmp_path: Path) -> None:
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    proc = start(["consensus", str(fifo), "--out", str(out)], tmp_path)
    with fifo.open("w") as writer:  # returns once the command has opened it to read
        writer.write('{"candidates": ["a", "b"]}\n')
        writer.flush()
        terminate(proc)
    assert not out.exists()


def test_sigterm_exits_130_from_export_leaving_no_temporary(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    line = {"id": "ei-0", "instruction": "Say it." * 20, "input": "", "output": "It." * 50}
    with records.open("w") as f:
        for i in range(150_000):
            f.write(json.dumps({**line, "id": f"ei-{i}"}) + "\n")
    out_dir = tmp_path / "exported"
    out_dir.mkdir()
    proc = start(
        ["export", "--format", "chat", str(records), str(out_dir / "chat.jsonl")], tmp_path
    )
    deadline = time.monotonic() + 60
    while not any(out_dir.iterdir()):  # the temporary file appears: the export is writing
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.skip("the export finished before it could be interrupted")
        time.sleep(0.001)
    terminate(proc)
    assert list(out_dir.iterdir()) == []  # neither a half export nor a temporary file


def test_text_that_looks_like_markup_is_printed_as_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ask", "[/INST] say [b]hi[/b]", "--no-chat", "--attempts", "1"]
    code = cli.main([*argv, "--member", "tgi=http://127.0.0.1:9,name=[/x]"])
    assert code == cli.EXIT_BACKENDS_FAILED
    out = capsys.readouterr().out
    assert "[/INST] say [b]hi[/b]" in out and "[/x]" in out
    bad = tmp_path / "in.jsonl"
    bad.write_text("[/oops]\n")
    assert cli.main(["consensus", str(bad)]) == cli.EXIT_USAGE
    assert "in.jsonl:1: not JSON" in " ".join(capsys.readouterr().err.split())
