"""A server that answers garbage (200 with a body that is not the protocol) at the
command line: a clear message naming the problem and a documented non-zero exit."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_generate import config_text, read_jsonl, write_config

from ensemble_async import cli


class _Garbage(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b"<html>this is not JSON</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def garbage_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_check_names_the_garbage_answer_and_exits_3(
    garbage_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the table's cells are not cut short
    cfg = write_config(
        tmp_path / "cfg.toml", config_text(garbage_url, garbage_url, tmp_path / "r.jsonl")
    )
    assert cli.main(["check", "--config", str(cfg), "--timeout", "5"]) == cli.EXIT_BACKENDS_FAILED
    out = " ".join(capsys.readouterr().out.split())
    assert "MalformedResponseError" in out or "not JSON" in out


def test_generate_against_garbage_exits_3_and_writes_no_records(
    garbage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    text = config_text(garbage_url, garbage_url, out, io_n=2, o_n=1).replace(
        "concurrency = 8", "concurrency = 8\nmax_attempts = 2"
    )
    cfg = write_config(tmp_path / "cfg.toml", text)
    assert cli.main(["generate", "--config", str(cfg), "--quiet"]) == cli.EXIT_BACKENDS_FAILED
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert "cannot serve" in said  # the probe before the first item stops it
    assert not out.exists() or read_jsonl(out) == []
