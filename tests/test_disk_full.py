"""A disk that fills up mid-run: a clear error, exit 4, records already written intact,
and the same command continues once there is space again.  Needs root (a small tmpfs)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_generate import config_text, read_jsonl, run_cli, servers, write_config

from ensemble_async import cli

__all__ = ["servers"]  # the module-scoped fixture of the doubles, shared

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_stops_cleanly_and_the_rerun_continues(
    servers: tuple[str, str], small_disk: Path, tmp_path: Path
) -> None:
    out = small_disk / "out" / "records.jsonl"
    write_config(tmp_path / "cfg.toml", config_text(*servers, out, io_n=200, o_n=100))

    full = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=tmp_path)
    message = " ".join(full.stderr.split())
    assert full.returncode == cli.EXIT_OUTPUT, full.stderr[-2000:]
    assert "run.output" in message and "full" in message and "Traceback" not in full.stderr
    before = read_jsonl(out)  # every line written so far is valid JSON

    # Make room, then the same command continues where it stopped.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=tmp_path)
    assert again.returncode == cli.EXIT_OK, again.stderr[-2000:]
    after = read_jsonl(out)
    assert after[: len(before)] == before and len(after) > len(before)
    assert len({r["id"] for r in after}) == len(after)
