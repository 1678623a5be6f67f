"""A run's files may not collide: records, rejects, cache, log, manifest, deferred list,
summary, seeds and the config itself are distinct files (links resolved), checked
before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ensemble_async import cli

CONFIG = """
[run]
seed = 1
output = "{out}"
{extra}
targets = {{ input_output = 1, output = 1 }}

[backends.w]
kind = "tgi"
url = "http://127.0.0.1:9"

[backends.a]
kind = "openai"
url = "http://127.0.0.1:9"

[roles]
writer = "w"
answerers = ["a"]
"""


def _config(tmp_path: Path, out: Path, extra: str = "") -> Path:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(out=out, extra=extra))
    return cfg


@pytest.mark.parametrize(
    ("extra", "args", "names"),
    [
        (
            'rejects = "{d}/c.sqlite"\ncache_path = "{d}/c.sqlite"',
            [],
            ("run.cache_path", "run.rejects"),
        ),
        ("", ["--log-jsonl", "{d}/out.jsonl"], ("--log-jsonl", "run.output")),
        ('seeds = "{d}/out.jsonl"', [], ("run.seeds", "run.output")),
        ("", ["--output", "{d}/cfg.toml"], ("the config file", "run.output")),
        ('rejects = "{d}/out.manifest.json"', [], ("the manifest", "run.rejects")),
    ],
)
def test_colliding_files_exit_2_and_touch_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    args: list[str],
    names: tuple[str, str],
) -> None:
    d = tmp_path
    (d / "out.jsonl").write_text('{"id": "kept"}\n')
    cfg = _config(tmp_path, d / "out.jsonl", extra.format(d=d))
    before = {p: p.read_bytes() for p in d.iterdir() if p.is_file()}
    shown = [a.format(d=d) for a in args] or ["--quiet"]
    code = cli.main(["generate", "--config", str(cfg), *shown])
    err = " ".join(capsys.readouterr().err.split())
    assert code == cli.EXIT_USAGE, err
    assert all(name in err for name in names), err
    assert "same file" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in d.iterdir() if p.is_file()} == before


def test_a_hard_link_is_the_same_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "kept"}\n')
    os.link(out, tmp_path / "also.jsonl")
    cfg = _config(tmp_path, out, f'rejects = "{tmp_path / "also.jsonl"}"')
    assert cli.main(["generate", "--config", str(cfg), "--quiet"]) == cli.EXIT_USAGE
    assert "same file" in capsys.readouterr().err
