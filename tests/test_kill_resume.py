"""SIGKILL at 20 random points of one pipeline run, restarting the same command each
time: the result equals an uninterrupted run (same records, no duplicate ids, every line
valid JSON, cache readable)."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from served import Server
from test_cli_generate import config_text, read_jsonl, run_cli, servers, write_config

__all__ = ["servers"]  # the module-scoped fixture of the doubles, shared

pytestmark = pytest.mark.slow

KILLS = 20


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_at_20_random_points_then_resume_equals_uninterrupted_run(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    write_config(
        full / "cfg.toml", config_text(*servers, Path("out/records.jsonl"), io_n=60, o_n=30)
    )
    done = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=full)
    assert done.returncode == 0, done.stderr
    expected = read_jsonl(full / "out" / "records.jsonl")
    expected_rejects = read_jsonl(full / "out" / "records.rejects.jsonl")

    work = tmp_path / "killed"
    work.mkdir()
    write_config(
        work / "cfg.toml", config_text(*servers, Path("out/records.jsonl"), io_n=60, o_n=30)
    )
    records = work / "out" / "records.jsonl"
    rng = random.Random(20261126)
    argv = [sys.executable, "-m", "ensemble_async", "generate", "--config", "cfg.toml"]
    kills = 0
    for _ in range(KILLS * 3):  # bounded: a run that finishes before its kill point ends it
        if kills == KILLS:
            break
        # A random point: after a random number of log lines, or of new records on disk.
        by_records = rng.random() < 0.5
        target = rng.randint(1, 4) if by_records else rng.randint(1, 120)
        start = _lines(records)
        proc = subprocess.Popen(
            [*argv, "--log-jsonl", "-"], cwd=work, stderr=subprocess.PIPE, text=True
        )
        assert proc.stderr is not None
        killed = False
        for seen, _line in enumerate(proc.stderr, 1):  # sync: the child's own log lines
            progress = _lines(records) - start if by_records else seen
            if progress >= target:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        proc.wait(60)
        proc.stderr.close()
        if not killed:
            assert proc.returncode == 0  # it finished before the kill point
            break
        assert proc.returncode == -signal.SIGKILL
        kills += 1
    assert kills == KILLS, f"only {kills} kills before the run finished"

    again = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=work)
    assert again.returncode == 0, again.stderr
    resumed = read_jsonl(records)  # every line valid JSON
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)), "duplicate ids"
    key = lambda r: (r["id"], r["instruction"], r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, expected))
    rejects = read_jsonl(work / "out" / "records.rejects.jsonl")
    assert len({r["id"] for r in rejects}) == len(rejects)
    assert {r["id"] for r in rejects} == {r["id"] for r in expected_rejects}
    with sqlite3.connect(work / "out" / "records.cache.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_kill_and_resume_at_concurrency_256_with_15_percent_faults(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    """Servers that fail 15% of requests (503 or a reset), 256 requests in flight, three
    SIGKILLs, then the same command until it exits 0 (5 = items deferred: rerun): the
    records equal a fault-free uninterrupted run's, no slot filled twice."""
    fast = "\n[overrides]\ninstance_concurrency = 256\nanswer_concurrency = 256\nqueue_size = 256\n"

    def config(tgi: str, oai: str) -> str:
        text = config_text(tgi, oai, Path("out/records.jsonl"), io_n=60, o_n=30, extra=fast)
        return text.replace("concurrency = 8", "concurrency = 256\nmax_attempts = 3")

    full = tmp_path / "full"
    full.mkdir()
    write_config(full / "cfg.toml", config(*servers))
    done = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=full)
    assert done.returncode == 0, done.stderr
    expected = read_jsonl(full / "out" / "records.jsonl")
    expected_rejects = read_jsonl(full / "out" / "records.rejects.jsonl")

    faulty = [
        Server("tgi", "--ei", "writer-lm", "--latency", "0.002", "--fault-rate", "0.15"),
        Server("openai", "--ei", "answer-lm", "--latency", "0.002", "--fault-rate", "0.15"),
    ]
    try:
        rng = random.Random(256)
        argv = [sys.executable, "-m", "ensemble_async", "generate", "--config", "cfg.toml"]
        # Three kills of one run. A batch written just before a kill can hold many
        # records, so the third run may find too few left to reach its kill point and
        # finish: that series starts over in a fresh folder (bounded).
        for series in range(5):
            work = tmp_path / f"faulty-{series}"
            work.mkdir()
            write_config(work / "cfg.toml", config(faulty[0].url, faulty[1].url))
            records = work / "out" / "records.jsonl"
            kills = 0
            while kills < 3:
                target = rng.randint(1, 8)
                start = _lines(records)
                proc = subprocess.Popen(
                    [*argv, "--log-jsonl", "-"], cwd=work, stderr=subprocess.PIPE
                )
                assert proc.stderr is not None
                for _line in proc.stderr:
                    if _lines(records) - start >= target:
                        proc.send_signal(signal.SIGKILL)
                        break
                proc.wait(120)
                proc.stderr.close()
                if proc.returncode != -signal.SIGKILL:
                    assert proc.returncode in (0, 5), proc.returncode  # done, or deferred
                    break
                kills += 1
            if kills == 3:
                break
        assert kills == 3, "every series of runs ended before its third kill point"
        codes = []
        for _ in range(10):
            again = run_cli("generate", "--config", "cfg.toml", "--quiet", cwd=work)
            codes.append(again.returncode)
            if again.returncode != 5:
                break
        assert codes[-1] == 0, (codes, again.stderr[-2000:])
    finally:
        for server in faulty:
            server.stop()
    resumed = read_jsonl(records)
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)), "duplicate ids"
    slots = [(r["type"], r["provenance"]["instruction_index"]) for r in resumed]
    assert len(slots) == len(set(slots)), "a slot filled twice"
    key = lambda r: (r["id"], r["instruction"], r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, expected))
    rejects = read_jsonl(work / "out" / "records.rejects.jsonl")
    assert sorted(r["id"] for r in rejects) == sorted(r["id"] for r in expected_rejects)
    assert not (work / "out" / "records.deferred.jsonl").exists()
