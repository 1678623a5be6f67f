"""Records, rejects and the append-only JSONL files that hold them.

Typed records.  ``Record`` (a kept example), ``Reject`` (an item dropped, with its
reason) and ``CandidateRecord`` (one candidate answer in a record's provenance) are
frozen dataclasses, each with one serialiser (``to_json``) and one reader
(``from_json``).  The JSON layout is the one every earlier version wrote (same keys,
same order); fields added later are written after the old ones and only when set, so
old files read back unchanged.

Files.  ``RecordFile`` is one JSONL file open for appending: one JSON object per line,
each with a string ``id``.  Lines are appended with ``write()`` on an ``O_APPEND``
descriptor and made durable with ``fsync``; a line whose id the file already holds is
not written again, so a resumed run can offer a record twice without duplicating it.
``RecordFile`` does blocking I/O: the pipeline reaches it only through
:class:`~ensemble_async.sink.AsyncRecordWriter`, whose one writer thread owns it.

Opening checks, repairs and refuses:

* the path must be (or become) a regular file: a device, a FIFO or a folder is
  refused (``NotARecordsFileError``) before anything is read;
* an existing non-empty file whose first line is not a record (``note.txt``, a sqlite
  database) is refused (``NotARecordsFileError``), never "repaired";
* a torn last line (killed mid-write: bytes without their newline) is repaired: a whole
  JSON record just gets its newline; anything else, and a last newline-terminated line
  that is not a record, is cut off after being appended to ``<file>.torn`` (fsynced);
* a bad line before the last is not a crash artefact: ``CorruptRecordFileError``
  names ``file:line`` and nothing is changed;
* one writer per file: the file is locked (``flock``); a second writer gets
  ``RecordFileLockedError``;
* a file that cannot be created, read or written (full disk, read-only, a file where a
  folder should be) raises ``RecordStorageError``.

All four are ``RecordFileError``s.  ``RecordWriter`` is the small synchronous pair of
files (records + rejects) for scripts and tests; it blocks on the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeAlias

from . import atomicfile

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CandidateRecord",
    "CorruptRecordFileError",
    "Deferred",
    "NotARecordsFileError",
    "Provenance",
    "Record",
    "RecordFile",
    "RecordFileError",
    "RecordFileLockedError",
    "RecordStorageError",
    "RecordWriter",
    "Reject",
    "Slot",
    "default_rejects_path",
    "read_records",
    "sidecar_path",
    "slot_of",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- errors


class RecordFileError(Exception):
    """A record file cannot be used; the subclass says why, the message names the file."""


class RecordFileLockedError(RecordFileError):
    """Another run holds the file open for writing."""


class NotARecordsFileError(RecordFileError):
    """The path is not a regular file, or an existing file that is not a records file."""


class CorruptRecordFileError(RecordFileError):
    """A records file with a bad line before its last (not a crash artefact)."""


class RecordStorageError(RecordFileError):
    """The disk refused: full, read-only, I/O error, or a path that cannot be created."""


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _storage_error(what: str, path: Path, exc: OSError) -> RecordStorageError:
    return RecordStorageError(f"cannot {what} {path}: {exc.strerror or exc}")


# ------------------------------------------------------------------------ typed records


def _drop_none(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in items if v is not None}


def _finite(value: Any) -> Any:
    """``value`` with every float JSON cannot hold (``-inf``: a candidate without a usable
    score under the target; ``nan``) as None, so a record is always one JSON line."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    """One candidate answer as a record's provenance keeps it (no timings: a record must
    not depend on timing).  ``model``, ``backend`` and ``host`` say who served it (the
    served model id, the backend kind, the server's host and port; never credentials)."""

    index: int
    source: str
    status: str
    text: str | None
    error: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_style: str | None = None
    model: str | None = None
    backend: str | None = None
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "source": self.source,
            "status": self.status,
            "text": self.text,
            "error": self.error,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
            "prompt_style": self.prompt_style,
        }
        out.update(
            _drop_none((("model", self.model), ("backend", self.backend), ("host", self.host)))
        )
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CandidateRecord:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Provenance:
    """How a record (or a consensus reject) was decided.  ``decision`` is the consensus
    selection as :meth:`~ensemble_async.consensus.Selection.to_dict` gives it, plus the
    policy (a score JSON cannot hold, such as ``-inf``, is written as null).
    ``writer_answer``: the writer's own zero-shot answer when it is kept for provenance
    only (never a vote).  ``library_version``, ``created_at`` (UTC, ISO 8601)
    and ``fingerprint`` (the run manifest's) are written when known."""

    writer: str
    instruction_attempt: int
    instruction_index: int
    novelty_max_rouge: float | None
    candidates: tuple[CandidateRecord, ...]
    decision: Mapping[str, Any]
    preset: str
    seed: int
    writer_answer: CandidateRecord | None = None
    library_version: str | None = None
    created_at: str | None = None
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "writer": self.writer,
            "instruction_attempt": self.instruction_attempt,
            "instruction_index": self.instruction_index,
            "novelty_max_rouge": self.novelty_max_rouge,
            "candidates": [c.to_json() for c in self.candidates],
            "decision": _finite(self.decision),
            "preset": self.preset,
            "seed": self.seed,
        }
        if self.writer_answer is not None:
            out["writer_answer"] = self.writer_answer.to_json()
        out.update(
            _drop_none(
                (
                    ("library_version", self.library_version),
                    ("created_at", self.created_at),
                    ("fingerprint", self.fingerprint),
                )
            )
        )
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Provenance:
        answer = data.get("writer_answer")
        return cls(
            writer=data["writer"],
            instruction_attempt=data["instruction_attempt"],
            instruction_index=data["instruction_index"],
            novelty_max_rouge=data.get("novelty_max_rouge"),
            candidates=tuple(CandidateRecord.from_json(c) for c in data["candidates"]),
            decision=dict(data["decision"]),
            preset=data["preset"],
            seed=data["seed"],
            writer_answer=None if answer is None else CandidateRecord.from_json(answer),
            library_version=data.get("library_version"),
            created_at=data.get("created_at"),
            fingerprint=data.get("fingerprint"),
        )


Slot: TypeAlias = tuple[int, str, int]
"""An instruction slot: (run seed, task kind, position among the kind's accepted
instructions).  Once a record or a reject fills it, it is decided for good."""


@dataclass(frozen=True, slots=True)
class Record:
    """One kept example."""

    id: str
    type: str
    instruction: str
    input: str
    output: str
    provenance: Provenance

    @property
    def slot(self) -> Slot:
        p = self.provenance
        return (p.seed, self.type, p.instruction_index)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "provenance": self.provenance.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        return cls(
            id=data["id"],
            type=data["type"],
            instruction=data["instruction"],
            input=data["input"],
            output=data["output"],
            provenance=Provenance.from_json(data["provenance"]),
        )


@dataclass(frozen=True, slots=True)
class Reject:
    """One item dropped, with its ``stage`` and ``reason`` and what explains it.

    Step-1 rejects carry ``attempt`` and ``seed``; later ones the instruction (and
    ``instruction_index``, which names the slot they decide); consensus rejects the
    full ``provenance``.  Unset fields are not written."""

    id: str
    stage: str
    reason: str
    type: str
    attempt: int | None = None
    seed: int | None = None
    instruction_index: int | None = None
    instruction: str | None = None
    input: str | None = None
    text: str | None = None
    error: str | None = None
    max_rouge: float | None = None
    most_similar: str | None = None
    provenance: Provenance | None = None

    @property
    def slot(self) -> Slot | None:
        if self.stage == "instructions":
            return None
        seed = self.seed if self.seed is not None else getattr(self.provenance, "seed", None)
        index = self.instruction_index
        if index is None and self.provenance is not None:
            index = self.provenance.instruction_index
        if seed is None or index is None:
            return None
        return (seed, self.type, index)

    def to_json(self) -> dict[str, Any]:
        head = _drop_none(
            (
                ("id", self.id),
                ("stage", self.stage),
                ("type", self.type),
                ("attempt", self.attempt),
                ("seed", self.seed),
                ("instruction_index", self.instruction_index),
                ("reason", self.reason),
                ("instruction", self.instruction),
                ("input", self.input),
                ("text", self.text),
                ("error", self.error),
                ("max_rouge", self.max_rouge),
            )
        )
        if self.stage == "instructions" and self.reason == "not_novel":
            head["most_similar"] = self.most_similar
        if self.provenance is not None:
            head["provenance"] = self.provenance.to_json()
        return head

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reject:
        prov = data.get("provenance")
        known = {f.name for f in dataclasses.fields(cls)} - {"provenance"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            provenance=None if prov is None else Provenance.from_json(prov),
        )


@dataclass(frozen=True, slots=True)
class Deferred:
    """An item neither kept nor rejected because a member was unavailable (breaker
    open, retries exhausted): the next run of the same command picks it up again.
    ``attempt`` is set for step 1 (the kind stopped there), ``instruction_index`` for
    later stages."""

    stage: str
    type: str
    reason: str
    seed: int
    attempt: int | None = None
    instruction_index: int | None = None
    instruction: str | None = None
    members: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        out = _drop_none(
            (
                ("stage", self.stage),
                ("type", self.type),
                ("reason", self.reason),
                ("seed", self.seed),
                ("attempt", self.attempt),
                ("instruction_index", self.instruction_index),
                ("instruction", self.instruction),
            )
        )
        out["members"] = list(self.members)
        return out


Entry: TypeAlias = Record | Reject | Mapping[str, Any]


def entry_json(entry: Entry) -> dict[str, Any]:
    """The JSON object of a record or reject (a plain mapping is taken as it is)."""
    if isinstance(entry, Record | Reject):
        return entry.to_json()
    return dict(entry)


def slot_of(data: Mapping[str, Any]) -> Slot | None:
    """The instruction slot a record or reject line decides, when it says so."""
    prov = data.get("provenance")
    prov = prov if isinstance(prov, Mapping) else {}
    stage = data.get("stage")
    if stage == "instructions":
        return None
    seed = data.get("seed", prov.get("seed"))
    index = data.get("instruction_index", prov.get("instruction_index"))
    kind = data.get("type")
    if isinstance(seed, int) and isinstance(index, int) and isinstance(kind, str):
        return (seed, kind, index)
    return None


# ----------------------------------------------------------------------------- paths


def sidecar_path(path: str | Path, suffix: str) -> Path:
    """``out/records.jsonl`` + ``rejects.jsonl`` -> ``out/records.rejects.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{suffix}")


def default_rejects_path(path: str | Path) -> Path:
    """``out/records.jsonl`` -> ``out/records.rejects.jsonl``."""
    return sidecar_path(path, "rejects.jsonl")


# ------------------------------------------------------------------------------ files


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The record on one line (without its newline), or None when it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        return None
    return value


def _iter_lines(f: Any) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line's end, raw line) for each line of ``f``."""
    offset = 0
    for number, raw in enumerate(f, start=1):
        offset += len(raw)
        yield number, offset, raw


def _check_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        what = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a character device"
            if stat.S_ISCHR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a block device"
            if stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise NotARecordsFileError(
            f"{path} is {what}, not a records file; name a regular file (or a new path)"
        )


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Each record of a JSONL record file, in file order.

    Blank lines are skipped, and so is a torn last line (no newline, not valid JSON:
    a writer was killed; logged).  Any other line that is not a JSON object with a
    string ``id`` raises ``CorruptRecordFileError`` with ``file:line``; a path that is
    not a regular file raises ``NotARecordsFileError``.
    """
    p = Path(path)
    try:
        _check_regular(p, os.stat(p).st_mode)
        with p.open("rb") as f:
            for number, _end, raw in _iter_lines(f):
                if not raw.strip():
                    continue
                record = _parse(raw)
                if record is not None:
                    yield record
                elif not raw.endswith(b"\n"):
                    log.warning("%s:%d: torn last line (%d bytes) ignored", p, number, len(raw))
                else:
                    raise CorruptRecordFileError(
                        f"{p}:{number}: not a JSON record with a string id"
                    )
    except OSError as exc:
        raise RecordFileError(f"cannot read {p}: {exc.strerror or exc}") from exc


def _looks_like_a_torn_record(raw: bytes) -> bool:
    """Our serialiser starts every line with the id: a torn first line still shows it."""
    return raw.lstrip().startswith(b'{"id": ')


class RecordFile:
    """One JSONL file open for appending: checked, repaired, its ids (and the instruction
    slots its lines decide) loaded, locked.  Blocking: call it from one thread."""

    def __init__(self, path: Path, *, lock: bool = True) -> None:
        self.path = path
        self.ids: set[str] = set()
        self.slots: dict[Slot, str] = {}
        self.fd = -1
        try:
            _check_regular(path, os.stat(path).st_mode)
            created = False
        except FileNotFoundError:
            created = True
        except NotADirectoryError as exc:
            raise _storage_error("open", path, exc) from exc
        except OSError as exc:
            raise _storage_error("open", path, exc) from exc
        try:
            if created:
                path.parent.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: should a FIFO appear after the check, opening it cannot hang.
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
            self.fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise _storage_error("open for appending", path, exc) from exc
        try:
            _check_regular(path, os.fstat(self.fd).st_mode)
            os.set_blocking(self.fd, True)
            if lock and fcntl is not None:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RecordFileLockedError(
                        f"{path} is already open for writing by another run "
                        "(wait for it to finish, or choose another output)"
                    ) from None
            if created:
                _fsync_dir(path.parent)
            self.size = self._load_and_repair()
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            raise _storage_error("read", path, exc) from exc
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @property
    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)

    def _load_and_repair(self) -> int:
        good_end = 0
        first = True
        last: tuple[int, int, bytes] | None = None  # a bad line, kept if it is the last
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            for number, end, raw in _iter_lines(f):
                if last is not None:
                    raise CorruptRecordFileError(
                        f"{self.path}:{last[0]}: not a JSON record with a string id; "
                        "only a bad last line is repaired, fix or remove this one"
                    )
                if not raw.strip():
                    good_end = end
                    continue
                record = _parse(raw)
                if (
                    record is None
                    and first
                    and (raw.endswith(b"\n") or not _looks_like_a_torn_record(raw))
                ):
                    raise NotARecordsFileError(
                        f"{self.path} exists and is not a records file (line {number} "
                        "is not a JSON record with a string id); refusing to touch it: "
                        "choose another output or move the file away"
                    )
                first = False
                if record is None:
                    last = (number, end, raw)
                    continue
                self.ids.add(record["id"])
                slot = slot_of(record)
                if slot is not None:
                    self.slots[slot] = record["id"]
                if not raw.endswith(b"\n"):  # a whole record without its newline
                    os.write(self.fd, b"\n")
                    os.fsync(self.fd)
                    log.warning(
                        "%s:%d: completed a record that lacked its newline", self.path, number
                    )
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

    def encode(self, entry: Entry) -> tuple[str, bytes] | None:
        """The id and the line for ``entry``; None when the file already holds the id.
        Marks the id as present (the caller writes the line or gives up on the file)."""
        if self.fd < 0:
            raise RecordFileError(f"{self.path} is closed")
        data = entry_json(entry)
        rid = data.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"a record needs a non-empty string 'id', got {rid!r}")
        if rid in self.ids:
            return None
        try:
            line = (json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:  # a lone surrogate fails to encode as UTF-8
            raise ValueError(f"record {rid} is not JSON: {exc}") from exc
        self.ids.add(rid)
        slot = slot_of(data)
        if slot is not None:
            self.slots[slot] = rid
        return rid, line

    def append_lines(self, lines: Sequence[bytes]) -> None:
        """Append ``lines`` and fsync once.  On failure nothing partial stays behind."""
        if not lines:
            return
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as exc:
            # Leave no partial line behind for the next append to glue onto.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise _storage_error("append to", self.path, exc) from exc
        self.size += len(data)

    def append(self, entry: Entry) -> bool:
        encoded = self.encode(entry)
        if encoded is None:
            return False
        rid, line = encoded
        try:
            self.append_lines([line])
        except BaseException:
            self.ids.discard(rid)
            raise
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


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (``atomicfile``: temp file, fsync, rename,
    fsync dir); a failure is a ``RecordStorageError``."""
    try:
        atomicfile.write_text(path, text)
    except OSError as exc:
        raise _storage_error("write", path, exc) from exc


def open_pair(path: Path, rejects_path: Path) -> tuple[RecordFile, RecordFile]:
    """The records and rejects files, opened (blocking), refused when they are one."""
    if rejects_path.resolve() == path.resolve():
        raise NotARecordsFileError(f"records and rejects must be two files, both are {path}")
    with contextlib.suppress(OSError):  # one file under two names (a hard link)
        if os.path.samefile(path, rejects_path):
            raise NotARecordsFileError(
                f"records and rejects must be two files: {path} and {rejects_path} are the same"
            )
    records = RecordFile(path)
    try:
        rejects = RecordFile(rejects_path)
    except BaseException:
        records.close()
        raise
    if records.identity == rejects.identity:
        records.close()
        rejects.close()
        raise NotARecordsFileError(
            f"records and rejects must be two files: {path} and {rejects_path} are the same"
        )
    return records, rejects


class RecordWriter:
    """Durable, de-duplicating JSONL output for scripts and tests: kept records and
    rejects, written synchronously (each call waits for the disk; the pipeline uses
    :class:`~ensemble_async.sink.AsyncRecordWriter` instead).

    ``rejects_path`` defaults to ``default_rejects_path(path)``.  Parent folders are
    created.  Opening checks and repairs both files (see the module doc).  Entries are
    ``Record``/``Reject`` or dicts with a string ``id`` and JSON values
    (``ValueError`` otherwise).  Use it as a context manager or call ``close()``.
    """

    def __init__(self, path: str | Path, *, rejects_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.rejects_path = (
            Path(rejects_path) if rejects_path is not None else default_rejects_path(path)
        )
        self._records, self._rejects = open_pair(self.path, self.rejects_path)

    def has(self, record_id: str) -> bool:
        """Whether a kept record with this id is already on disk."""
        return record_id in self._records.ids

    def has_reject(self, record_id: str) -> bool:
        """Whether a reject with this id is already on disk."""
        return record_id in self._rejects.ids

    def write(self, record: Entry) -> bool:
        """Append a kept record (durable on return); False if its id is already there."""
        return self._records.append(record)

    def reject(self, record: Entry) -> bool:
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
