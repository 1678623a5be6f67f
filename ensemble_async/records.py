"""Append-only JSONL record files that survive being killed at any instant.

``RecordWriter`` keeps two files: the records (one JSON object per line, each with a
string ``id``) and the rejects (same format, its own ids).  Each ``write``/``reject``
appends one whole line with a single ``write()`` on an ``O_APPEND`` descriptor, then
``fsync``\\s it, so a record is on disk when the call returns.  A record whose id the
file already holds is skipped (the call returns False): a resumed run can offer the
same record again without duplicating it.

Killed mid-write (SIGKILL, power loss), a file can end in a torn line: bytes without
their trailing newline.  Opening the writer repairs that: a torn tail that is a whole
JSON record just gets its newline; anything else, and a last newline-terminated line
that is not a valid record, is cut off.  The cut bytes are first appended to
``<file>.torn`` (and fsynced) for forensics, then the file is truncated to the end of
its last valid line.  A bad line *before* the last one is not a crash artefact and is
never repaired: opening raises ``RecordFileError`` naming ``file:line``.

One writer per file at a time: the records file is locked (``flock``) while open, and
a second writer on it raises ``RecordFileError``.  ``write`` is synchronous (it waits
for the disk); that is the point, and one fsync per kept record is cheap beside the
model calls that produced it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["RecordFileError", "RecordWriter", "default_rejects_path", "read_records"]

log = logging.getLogger(__name__)


class RecordFileError(Exception):
    """A record file cannot be opened or written, or holds a corrupt line."""


def default_rejects_path(path: str | Path) -> Path:
    """``out/records.jsonl`` -> ``out/records.rejects.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rejects.jsonl")


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The record on one line (without its newline), or None when it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        return None
    return value


def _iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line's end, raw line) for each line."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            offset += len(raw)
            yield number, offset, raw


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Each record of a JSONL record file, in file order.

    Blank lines are skipped, and so is a torn last line (no newline, not valid JSON:
    a writer was killed; logged).  Any other line that is not a JSON object with a
    string ``id`` raises ``RecordFileError`` with ``file:line``.
    """
    p = Path(path)
    try:
        lines = _iter_lines(p)
        for number, _end, raw in lines:
            if not raw.strip():
                continue
            record = _parse(raw)
            if record is not None:
                yield record
            elif not raw.endswith(b"\n"):
                log.warning("%s:%d: torn last line (%d bytes) ignored", p, number, len(raw))
            else:
                raise RecordFileError(f"{p}:{number}: not a JSON record with a string id")
    except OSError as exc:
        raise RecordFileError(f"cannot read {p}: {exc.strerror or exc}") from exc


class _AppendFile:
    """One JSONL file open for appending: repaired, its ids loaded, optionally locked."""

    def __init__(self, path: Path, *, lock: bool) -> None:
        self.path = path
        self.ids: set[str] = set()
        self.fd = -1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RecordFileError(
                f"cannot open {path} for appending: {exc.strerror or exc}"
            ) from exc
        try:
            if lock and fcntl is not None:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RecordFileError(
                        f"{path} is already open for writing by another run"
                    ) from None
            if created:
                _fsync_dir(path.parent)
            self.size = self._load_and_repair()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _load_and_repair(self) -> int:
        good_end = 0
        last: tuple[int, int, bytes] | None = None  # a bad line, kept if it is the last
        for number, end, raw in _iter_lines(self.path):
            if last is not None:
                raise RecordFileError(
                    f"{self.path}:{last[0]}: not a JSON record with a string id; "
                    "only a bad last line is repaired, fix or remove this one"
                )
            record = _parse(raw)
            if record is None and raw.strip():
                last = (number, end, raw)
                continue
            if record is not None:
                self.ids.add(record["id"])
            if not raw.endswith(b"\n"):  # a whole record without its newline
                os.write(self.fd, b"\n")
                os.fsync(self.fd)
                log.warning("%s:%d: completed a record that lacked its newline", self.path, number)
                good_end = end + 1
            else:
                good_end = end
        size = os.fstat(self.fd).st_size
        if size > good_end:
            self._cut(good_end, size)
        return good_end

    def _cut(self, good_end: int, size: int) -> None:
        torn = os.pread(self.fd, size - good_end, good_end)
        keep = self.path.with_name(self.path.name + ".torn")
        with keep.open("ab") as f:
            f.write(torn if torn.endswith(b"\n") else torn + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(self.fd, good_end)
        os.fsync(self.fd)
        log.warning(
            "%s: cut a torn last line (%d bytes, copied to %s)", self.path, size - good_end, keep
        )

    def append(self, record: dict[str, Any]) -> bool:
        if self.fd < 0:
            raise RecordFileError(f"{self.path} is closed")
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"a record needs a non-empty string 'id', got {rid!r}")
        if rid in self.ids:
            return False
        try:
            line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"record {rid} is not JSON: {exc}") from exc
        data = line.encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as exc:
            # Leave no partial line behind for the next append to glue onto.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise RecordFileError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        self.size += len(data)
        self.ids.add(rid)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # also releases the lock


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RecordWriter:
    """Durable, de-duplicating JSONL output: kept records and rejects.

    ``rejects_path`` defaults to ``default_rejects_path(path)``.  Parent folders are
    created.  Opening (the constructor) repairs a torn last line and loads the ids of
    both files; ``RecordFileError`` names the path when a file cannot be opened, is
    locked by another writer, or holds a corrupt line before its last.  Records are
    dicts with a string ``id`` and JSON values (``ValueError`` otherwise).  Use it as a
    context manager or call ``close()``.
    """

    def __init__(self, path: str | Path, *, rejects_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.rejects_path = (
            Path(rejects_path) if rejects_path is not None else default_rejects_path(path)
        )
        if self.rejects_path.resolve() == self.path.resolve():
            raise RecordFileError(f"records and rejects must be two files, both are {path}")
        self._records = _AppendFile(self.path, lock=True)
        try:
            self._rejects = _AppendFile(self.rejects_path, lock=True)
        except BaseException:
            self._records.close()
            raise

    def has(self, record_id: str) -> bool:
        """Whether a kept record with this id is already on disk."""
        return record_id in self._records.ids

    def has_reject(self, record_id: str) -> bool:
        """Whether a reject with this id is already on disk."""
        return record_id in self._rejects.ids

    def write(self, record: dict[str, Any]) -> bool:
        """Append a kept record (durable on return); False if its id is already there."""
        return self._records.append(record)

    def reject(self, record: dict[str, Any]) -> bool:
        """Append a reject (durable on return); False if its id is already there."""
        return self._rejects.append(record)

    @property
    def count(self) -> int:
        """Kept records in the file (those from earlier runs included)."""
        return len(self._records.ids)

    @property
    def reject_count(self) -> int:
        return len(self._rejects.ids)

    def close(self) -> None:
        """Close both files (idempotent); writing afterwards raises RecordFileError."""
        self._records.close()
        self._rejects.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RecordWriter {str(self.path)!r} records={self.count} rejects={self.reject_count}>"
