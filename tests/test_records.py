"""RecordWriter and read_records: durability, torn-line repair, duplicates, SIGKILL."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ensemble_async.records import (
    Provenance,
    Record,
    RecordFileError,
    RecordWriter,
    default_rejects_path,
    read_records,
)


def rec(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"ei-{i:04d}", "instruction": f"Do thing {i}", "output": f"done {i}", **extra}


def lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def test_write_appends_one_line_each_and_skips_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "records.jsonl"
    with RecordWriter(out) as w:
        assert w.write(rec(1, note="line\nbreak é"))
        assert w.write(rec(2))
        assert not w.write(rec(1, output="changed"))
        assert w.reject({"id": "ei-0003", "reason": "too-short"})
        assert not w.reject({"id": "ei-0003", "reason": "again"})
        assert w.has("ei-0001")
        assert not w.has("ei-0003")
        assert w.has_reject("ei-0003")
        assert (w.count, w.reject_count) == (2, 1)
    got = lines(out)
    assert [r["id"] for r in got] == ["ei-0001", "ei-0002"]
    assert got[0]["note"] == "line\nbreak é"
    assert got[0]["output"] == "done 1"
    assert [r["reason"] for r in lines(default_rejects_path(out))] == ["too-short"]


def test_duplicates_are_skipped_across_reopen(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    rejects = tmp_path / "why.jsonl"
    with RecordWriter(out, rejects_path=rejects) as w:
        for i in range(5):
            w.write(rec(i))
        w.reject({"id": "x", "reason": "r"})
    with RecordWriter(out, rejects_path=rejects) as w:
        assert w.count == 5
        assert w.has("ei-0003")
        assert w.has_reject("x")
        written = [w.write(rec(i)) for i in range(3, 8)]
        assert written == [False, False, True, True, True]
        assert not w.reject({"id": "x", "reason": "r"})
    assert [r["id"] for r in lines(out)] == [f"ei-{i:04d}" for i in range(8)]
    assert len(lines(rejects)) == 1


@pytest.mark.parametrize(
    "tail",
    [
        b'{"id": "ei-0009", "instruction": "half',  # torn mid-record
        b'{"id": "ei-0009", "instr\xc3',  # torn inside a UTF-8 sequence
        b"not json at all\n",  # a bad last line even with its newline
        b'["a list", "not a record"]\n',
    ],
)
def test_torn_last_line_is_cut_and_kept_aside(tmp_path: Path, tail: bytes) -> None:
    out = tmp_path / "r.jsonl"
    with RecordWriter(out) as w:
        w.write(rec(1))
        w.write(rec(2))
    good = out.read_bytes()
    out.write_bytes(good + tail)
    with RecordWriter(out) as w:
        assert w.count == 2
        assert not w.has("ei-0009")
        assert w.write(rec(3))
    assert [r["id"] for r in lines(out)] == ["ei-0001", "ei-0002", "ei-0003"]
    torn = out.with_name("r.jsonl.torn").read_bytes()
    assert torn.rstrip(b"\n") == tail.rstrip(b"\n")


def test_whole_record_missing_its_newline_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(json.dumps(rec(1)).encode() + b"\n" + json.dumps(rec(2)).encode())
    with RecordWriter(out) as w:
        assert w.count == 2
        w.write(rec(3))
    assert [r["id"] for r in lines(out)] == ["ei-0001", "ei-0002", "ei-0003"]
    assert not out.with_name("r.jsonl.torn").exists()


def test_corrupt_middle_line_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps(rec(1)) + "\n{broken\n" + json.dumps(rec(2)) + "\n")
    before = out.read_bytes()
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2"):
        RecordWriter(out)
    assert out.read_bytes() == before  # nothing repaired behind the user's back
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2"):
        list(read_records(out))


def test_read_records_tolerates_only_a_torn_tail(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps(rec(1)) + "\n\n" + json.dumps(rec(2)) + '\n{"id": "ei-3", "x')
    assert [r["id"] for r in read_records(out)] == ["ei-0001", "ei-0002"]
    out.write_text(json.dumps(rec(1)) + '\n{"no_id": 1}\n')
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2"):
        list(read_records(out))
    with pytest.raises(RecordFileError, match=r"missing\.jsonl"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_bad_records_are_refused(tmp_path: Path) -> None:
    with RecordWriter(tmp_path / "r.jsonl") as w:
        with pytest.raises(ValueError, match="'id'"):
            w.write({"instruction": "no id"})
        with pytest.raises(ValueError, match="not JSON"):
            w.write({"id": "a", "value": float("nan")})
        with pytest.raises(ValueError, match="not JSON"):
            w.write({"id": "b", "value": object()})
        assert w.count == 0
    assert (tmp_path / "r.jsonl").read_bytes() == b""
    w.close()
    with pytest.raises(RecordFileError, match="closed"):
        w.write(rec(1))


def test_an_entry_that_is_not_valid_unicode_is_refused_and_not_marked_present(
    tmp_path: Path,
) -> None:
    with RecordWriter(tmp_path / "r.jsonl") as w:
        with pytest.raises(ValueError, match="not JSON"):
            w.write({"id": "a", "output": "half an emoji \ud83d"})
        assert not w.has("a") and w.count == 0
        assert w.write({"id": "a", "output": "fixed"})  # the id was never taken
    assert [r["id"] for r in lines(tmp_path / "r.jsonl")] == ["a"]


def test_a_decision_with_infinite_scores_is_written_as_valid_json(tmp_path: Path) -> None:
    """Target-fit scores a candidate -inf (no tokens, or a server's -Infinity
    log-probability) or NaN: the record is still one valid JSON line, such scores
    written as null (no usable score), instead of the run stopping at that item."""
    decision = {
        "rule": "exact",
        "selection": {"rule": "target-fit", "scores": [[0, -1.5], [1, -math.inf], [2, math.nan]]},
    }
    prov = Provenance("w", 0, 0, 0.1, (), decision, "default", 42)
    record = Record("ei-x", "output", "Do X.", "", "done", prov)
    with RecordWriter(tmp_path / "r.jsonl") as w:
        assert w.write(record)
    (line,) = lines(tmp_path / "r.jsonl")
    assert line["provenance"]["decision"]["selection"]["scores"] == [
        [0, -1.5],
        [1, None],
        [2, None],
    ]
    assert prov.decision["selection"]["scores"][1][1] == -math.inf  # the value is untouched


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    # Tests run as root, so permissions cannot make a path unwritable; a regular file
    # standing where a folder should be does.
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with pytest.raises(RecordFileError, match=r"somefile/records\.jsonl"):
        RecordWriter(blocker / "records.jsonl")
    with pytest.raises(RecordFileError, match=r"somefile/why\.jsonl"):
        RecordWriter(tmp_path / "ok.jsonl", rejects_path=blocker / "why.jsonl")
    # The failed open released the records file: it can be opened again.
    RecordWriter(tmp_path / "ok.jsonl", rejects_path=tmp_path / "why.jsonl").close()


def test_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with RecordWriter(out), pytest.raises(RecordFileError, match="already open"):
        RecordWriter(out, rejects_path=tmp_path / "other.jsonl")
    with pytest.raises(RecordFileError, match="two files"):
        RecordWriter(out, rejects_path=out)


_CHILD = """
import sys
from ensemble_async.records import RecordWriter

path, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with RecordWriter(path) as w:
    for i in range(start, stop):
        rid = f"ei-{i:05d}"
        if w.write({"id": rid, "output": "word " * 2000 + str(i)}):
            print(rid, flush=True)
        if i % 3 == 0:
            w.reject({"id": rid, "reason": "every third"})
print("END", flush=True)
"""


def run_child(out: Path, start: int, stop: int, kill_after: int | None) -> list[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out), str(start), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked: list[str] = []
    try:
        for line in child.stdout:
            acked.append(line.strip())
            if kill_after is not None and len(acked) == kill_after:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.stdout.close()
        child.wait()
    if kill_after is not None:
        assert child.returncode == -signal.SIGKILL
    else:
        assert child.returncode == 0
    return acked


def test_sigkill_mid_stream_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    acked = run_child(out, 0, 10_000, kill_after=120)
    assert len(acked) == 120

    with RecordWriter(out) as w:
        for rid in acked:
            assert w.has(rid), rid
    on_disk = [r["id"] for r in lines(out)]
    assert len(on_disk) == len(set(on_disk))
    assert set(acked) <= set(on_disk)
    assert len(on_disk) <= len(acked) + 1  # at most the one in flight when killed

    # The same command again, to a smaller target: it finishes the set, no duplicates.
    resumed = run_child(out, 0, 300, kill_after=None)
    assert resumed[-1] == "END"
    assert not set(resumed) & set(on_disk)
    final = [r["id"] for r in lines(out)]
    assert sorted(final) == [f"ei-{i:05d}" for i in range(300)]
    rejects = [r["id"] for r in lines(default_rejects_path(out))]
    assert len(rejects) == len(set(rejects))
    assert set(rejects) >= {f"ei-{i:05d}" for i in range(0, 300, 3)}
