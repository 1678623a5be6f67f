"""The pipeline's output, written by one thread so the event loop never waits on disk.

``AsyncRecordWriter`` owns the records file and the rejects file
(:class:`~ensemble_async.records.RecordFile`) and one writer thread.  The loop side
decides at once whether an entry is new (the ids and decided instruction slots live in
memory), encodes it and puts its line on a bounded queue (``capacity`` entries: a
caller waits for room, never for the disk).  The thread takes every line queued, appends
each file's lines with one ``write`` and one ``fsync`` (group commit), and then resolves
the entries' futures in submission order.  So::

    done = await sink.submit(record)   # queued (waits only for room)
    await done                         # True: on disk and fsynced; False: already there

Opening (``await AsyncRecordWriter.open(...)``) runs the checks, the torn-line repair and
the scan of both files in a worker thread.  Beside the records it keeps
``<stem>.deferred.jsonl`` (the items the last run deferred; replaced atomically by
``write_deferred``) and ``<stem>.summary.json`` (``write_summary``), both written off
the loop.  After a write fails (full disk, or any other error in the writer thread),
every later entry fails with the same ``RecordStorageError``; what was acknowledged
before is on disk.  Once ``aclose`` is called, an entry still waiting for room is
refused (``RecordFileError``): no future is ever left pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from .records import (
    Deferred,
    Record,
    RecordFile,
    RecordFileError,
    RecordStorageError,
    Reject,
    Slot,
    default_rejects_path,
    open_pair,
    sidecar_path,
    write_atomic,
)

__all__ = ["AsyncRecordWriter", "MemoryRecordSink", "deferred_path", "summary_path"]

_BATCH = 1024
"""Most lines one group commit takes."""


def deferred_path(path: str | Path) -> Path:
    """``out/records.jsonl`` -> ``out/records.deferred.jsonl``."""
    return sidecar_path(path, "deferred.jsonl")


def summary_path(path: str | Path) -> Path:
    """``out/records.jsonl`` -> ``out/records.summary.json``."""
    return sidecar_path(path, "summary.json")


_Job = tuple[RecordFile, bytes, "asyncio.Future[bool]"]


def _read_deferred(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RecordFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    items = []
    for line in text.split("\n"):  # not splitlines(): U+2028 may stand inside a line
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                items.append(value)
    return items


class AsyncRecordWriter:
    """Records and rejects behind one writer thread.  Open with :meth:`open`."""

    def __init__(
        self,
        records: RecordFile,
        rejects: RecordFile,
        *,
        capacity: int,
        previous_deferred: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.path = records.path
        self.rejects_path = rejects.path
        self.deferred_path = deferred_path(self.path)
        self.summary_path = summary_path(self.path)
        self.previous_deferred = list(previous_deferred)
        """What the last run deferred (read when opened)."""
        self._records = records
        self._rejects = rejects
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Semaphore(capacity)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._failed: RecordFileError | None = None
        self._closed = False
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._work, name="record-writer", daemon=True)
        self._thread.start()

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        rejects_path: str | Path | None = None,
        capacity: int = 256,
    ) -> AsyncRecordWriter:
        """Check, repair and scan both files in a worker thread, then start the writer."""
        path = Path(path)
        rejects = Path(rejects_path) if rejects_path is not None else default_rejects_path(path)

        def opening() -> tuple[RecordFile, RecordFile, list[dict[str, Any]]]:
            records_file, rejects_file = open_pair(path, rejects)
            try:
                return records_file, rejects_file, _read_deferred(deferred_path(path))
            except BaseException:
                records_file.close()
                rejects_file.close()
                raise

        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, opening)
        try:
            records_file, rejects_file, previous = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The scan goes on in its thread: close what it opens, whenever it does.
            def close(done: asyncio.Future[tuple[RecordFile, RecordFile, Any]]) -> None:
                if not done.cancelled() and done.exception() is None:
                    for f in done.result()[:2]:
                        f.close()

            pending.add_done_callback(close)
            raise
        return cls(records_file, rejects_file, capacity=capacity, previous_deferred=previous)

    # -- reading (loop side, no I/O) --------------------------------------------------------

    def has(self, record_id: str) -> bool:
        """Whether a kept record with this id is on disk or queued."""
        return record_id in self._records.ids

    def has_reject(self, record_id: str) -> bool:
        return record_id in self._rejects.ids

    def decided(self, slot: Slot) -> Literal["record", "reject"] | None:
        """Whether a record or a reject already fills this instruction slot."""
        if slot in self._records.slots:
            return "record"
        if slot in self._rejects.slots:
            return "reject"
        return None

    @property
    def count(self) -> int:
        """Kept records (those from earlier runs and those queued included)."""
        return len(self._records.ids)

    @property
    def reject_count(self) -> int:
        return len(self._rejects.ids)

    # -- writing ------------------------------------------------------------------------------

    async def submit(self, entry: Record | Reject) -> asyncio.Future[bool]:
        """Queue ``entry`` (a ``Record`` to the records, a ``Reject`` to the rejects);
        waits only for room in the queue.  The future resolves True once the line is
        fsynced, False at once when the id is already there, or raises the
        ``RecordStorageError`` that stopped the writer."""
        if self._closed:
            raise RecordFileError(f"{self.path} is closed")
        if self._failed is not None:
            raise self._failed
        target = self._records if isinstance(entry, Record) else self._rejects
        done: asyncio.Future[bool] = self._loop.create_future()
        await self._room.acquire()
        if self._closed or self._failed is not None:
            # Closed (or failed) while waiting for room: the writer thread may be gone,
            # so nothing queued now would ever be written or answered.
            self._room.release()
            if self._failed is not None:
                raise self._failed
            raise RecordFileError(f"{self.path} is closed")
        try:
            encoded = target.encode(entry)
        except BaseException:
            self._room.release()
            raise
        if encoded is None:
            self._room.release()
            done.set_result(False)
            return done
        self._jobs.put((target, encoded[1], done))
        return done

    async def write(self, entry: Record | Reject) -> bool:
        """Submit and wait until it is durable (True) or known to be there (False)."""
        return await (await self.submit(entry))

    async def flush(self) -> None:
        """Wait until everything submitted so far is on disk."""
        marker: asyncio.Future[bool] = self._loop.create_future()
        if not self._closed:
            await self._room.acquire()
            if not self._closed:
                self._jobs.put((self._records, b"", marker))
                await marker
                return
            self._room.release()
        # Closing: the thread writes everything queued before it stops.
        await asyncio.shield(self._stopped)

    def _work(self) -> None:
        """The writer thread: group commits until the stop marker."""
        try:
            stop = False
            while not stop:
                job = self._jobs.get()
                if job is None:
                    break
                batch = [job]
                while len(batch) < _BATCH:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                error = self._failed
                if error is None:
                    try:
                        for target in (self._records, self._rejects):
                            target.append_lines([line for f, line, _ in batch if f is target])
                    except RecordFileError as exc:
                        error = self._failed = exc
                    except Exception as exc:  # e.g. out of memory: fail loudly, never hang
                        error = self._failed = RecordStorageError(
                            f"cannot append to {self.path}: {type(exc).__name__}: {exc}"
                        )
                self._call(self._settle, batch, error)
        finally:
            self._records.close()
            self._rejects.close()
            self._call(_resolve, self._stopped)

    def _call(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _settle(self, batch: list[_Job], error: RecordFileError | None) -> None:
        for _, _, done in batch:
            self._room.release()
            if done.done():
                continue
            if error is None:
                done.set_result(True)
            else:
                done.set_exception(error)
                done.exception()  # whoever awaits it still gets the error; no one else logs it

    # -- files beside the records ----------------------------------------------------------------

    async def write_deferred(self, items: Sequence[Deferred]) -> None:
        """Replace ``<stem>.deferred.jsonl`` with ``items`` (removed when empty)."""
        path = self.deferred_path
        text = "".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in items)

        def write() -> None:
            if text:
                write_atomic(path, text)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

        await asyncio.to_thread(write)

    async def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Replace ``<stem>.summary.json`` atomically."""
        text = json.dumps(summary, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        await asyncio.to_thread(write_atomic, self.summary_path, text)

    # -- closing ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Write what is queued, stop the thread, close the files (idempotent)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        await asyncio.shield(self._stopped)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<AsyncRecordWriter {str(self.path)!r} records={self.count} "
            f"rejects={self.reject_count}>"
        )


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class MemoryRecordSink:
    """The same interface in memory (no files): for benchmarks, and for runs whose
    caller keeps the records itself.  ``records``/``rejects`` hold what was accepted,
    in order; ``offered`` counts every submission, duplicates included."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.rejects: list[Reject] = []
        self.deferred: list[Deferred] = []
        self.summary: dict[str, Any] = {}
        self.offered = 0
        self.duplicates = 0
        self._ids: set[str] = set()
        self._reject_ids: set[str] = set()
        self._slots: dict[Slot, Literal["record", "reject"]] = {}

    def has(self, record_id: str) -> bool:
        return record_id in self._ids

    def decided(self, slot: Slot) -> Literal["record", "reject"] | None:
        return self._slots.get(slot)

    async def submit(self, entry: Record | Reject) -> asyncio.Future[bool]:
        self.offered += 1
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        ids = self._ids if isinstance(entry, Record) else self._reject_ids
        if entry.id in ids:
            self.duplicates += 1
            done.set_result(False)
            return done
        ids.add(entry.id)
        if isinstance(entry, Record):
            self.records.append(entry)
            self._slots[entry.slot] = "record"
        else:
            self.rejects.append(entry)
            if entry.slot is not None:
                self._slots[entry.slot] = "reject"
        done.set_result(True)
        return done

    async def write_deferred(self, items: Sequence[Deferred]) -> None:
        self.deferred = list(items)

    async def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.summary = dict(summary)
