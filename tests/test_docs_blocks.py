"""Every code block in README.md and docs/ works as written.

* Python blocks run as programs, the servers they name (``http://gpu1:8080`` ...)
  replaced by the project's doubles; README's blocks run as one program, in order.
* TOML blocks parse; a full run configuration (one with ``[roles]``) loads and validates.
* Every ``python -m ensemble_async ...`` line of a shell block parses with the real
  argument parser (subcommand and options exist); the export, report and show lines of
  docs/datasets.md and docs/report.md also run, on a generated run.

A block preceded by ``<!-- docs-test: skip (why) -->`` is skipped, and says why.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from served import Server

from ensemble_async import cli
from ensemble_async.config import parse_config
from ensemble_async.testing.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)
SKIP = "<!-- docs-test: skip"


def blocks(page: Path, lang: str) -> list[tuple[int, str]]:
    """``(line number, body)`` of every ``lang`` block of ``page`` not marked skip."""
    text = "\n" + page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        if m.group("lang") == lang and not m.group("before").startswith(SKIP):
            found.append((text.count("\n", 0, m.start("body")) - 1, m.group("body")))
    return found


def cli_lines(body: str) -> Iterator[str]:
    """The ``python -m ensemble_async`` commands of a shell block, continuations joined,
    comments and leading ``VAR=...`` assignments dropped."""
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words = words[1:]
        if words[:3] == ["python", "-m", "ensemble_async"]:
            yield shlex.join(words[3:])


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    tgi, tgi2 = Server("tgi"), Server("tgi")
    oai, oai2 = Server("openai"), Server("openai")
    try:
        yield {
            "http://gpu1:8080": tgi.url,
            "http://gpu3:8080": tgi2.url,
            "http://gpu2:8000": oai.url,
            "http://gpu3:8000": oai2.url,
            "https://api.example.com": oai.url,
        }
    finally:
        for server in (tgi, tgi2, oai, oai2):
            server.stop()


def _run(program: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _substitute(code: str, urls: dict[str, str]) -> str:
    for name, url in urls.items():
        code = code.replace(name, url)
    return code


def test_readme_python_blocks_run(urls: dict[str, str], tmp_path: Path) -> None:
    code = "\n\n".join(body for _, body in blocks(ROOT / "README.md", "python"))
    assert "async def label" in code  # the ensemble example defines label(); call it
    code += '\n\nasyncio.run(label(["Name a colour.", "Name a fruit."]))\n'
    done = _run(_substitute(code, urls), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert sum(line.startswith(("tgi ", "openai")) for line in out) >= 2  # first block
    assert any(line.startswith(("0 ", "1 ")) for line in out)  # label(): index first


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name != "README.md" and blocks(p, "python")], ids=str
)
def test_docs_python_blocks_run(
    page: Path, urls: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if page.name == "datasets.md":  # it loads what the page's export commands wrote
        monkeypatch.chdir(tmp_path)
        records = write_synthetic_run(tmp_path / "out", 30)
        for args in (
            ["--format", "hf", str(records), "my-dataset", "--with-rejects"],
            ["--format", "parquet", str(records), "data.parquet"],
            ["--format", "messages", str(records), "sft.jsonl"],
        ):
            assert cli.main(["export", *args]) == cli.EXIT_OK
    for line, body in blocks(page, "python"):
        done = _run(_substitute(body, urls), tmp_path)
        assert done.returncode == 0, f"{page.name}:{line}\n{done.stderr[-3000:]}"


def test_toml_blocks_parse_and_full_configs_load() -> None:
    checked = 0
    for page in PAGES:
        for line, body in blocks(page, "toml"):
            data = tomllib.loads(body)
            if "roles" in data:
                parse_config(data, source=f"{page.name}:{line}")
            checked += 1
    assert checked >= 4


def test_every_documented_command_parses() -> None:
    parser = cli.build_parser()
    commands = 0
    for page in PAGES:
        for _, body in blocks(page, "bash"):
            for command in cli_lines(body):
                words = shlex.split(command)
                try:
                    args = parser.parse_args(words)
                except SystemExit as exc:  # argparse's way of refusing
                    pytest.fail(f"{page.name}: `{command}` does not parse ({exc})")
                assert args is not None
                commands += 1
    assert commands >= 20


def test_report_and_show_commands_of_the_docs_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_synthetic_run(tmp_path / "out", 40)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for page in (ROOT / "docs" / "report.md", ROOT / "docs" / "datasets.md"):
        for _, body in blocks(page, "bash"):
            for command in cli_lines(body):
                words = shlex.split(command)
                if "--push-to-hub" in words:
                    continue  # needs a Hub and a token: tests/test_export_hub.py
                code = cli.main(words)
                assert code == cli.EXIT_OK, command
                ran += 1
    assert ran >= 6
