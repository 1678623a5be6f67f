"""Export a records file to training formats that ``datasets.load_dataset("json")`` reads.

* ``export_alpaca``: one JSON list of ``{"instruction", "input", "output"}`` objects
  (the Alpaca layout).
* ``export_chat``: JSON Lines of ``{"messages": [user, assistant]}``; the user turn is
  the instruction, followed by a blank line and the input when there is one.

Both write a temporary file in the output's folder, ``fsync`` it and ``os.replace`` it
onto the output, so a reader (or a killed export) never sees a half-written file.  Both
return the number of examples written.  Records are read with
``ensemble_async.records.read_records`` (a torn last line is skipped); a record without
a string ``instruction`` or ``output`` (or with a non-string ``input``) raises
``ExportError`` naming the file and record id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from .atomicfile import AtomicWriteError, replacing
from .records import RecordFileError, read_records

__all__ = ["ExportError", "export_alpaca", "export_chat"]


class ExportError(Exception):
    """The records cannot be read or exported, or the output cannot be written."""


def _examples(records_path: Path) -> Iterator[tuple[str, str, str]]:
    """(instruction, input, output) of each record."""
    try:
        for record in read_records(records_path):
            instruction = record.get("instruction")
            output = record.get("output")
            given = record.get("input")
            given = "" if given is None else given
            if not isinstance(instruction, str) or not isinstance(output, str):
                raise ExportError(
                    f"{records_path}: record {record['id']} lacks a string instruction/output"
                )
            if not isinstance(given, str):
                raise ExportError(f"{records_path}: record {record['id']} has a non-string input")
            yield instruction, given, output
    except RecordFileError as exc:
        raise ExportError(str(exc)) from exc


def _atomic_write(out_path: Path, source: Path, fill: Callable[[TextIO], int]) -> int:
    if out_path.resolve() == source.resolve():
        raise ExportError(f"refusing to export {source} onto itself")
    try:
        with replacing(out_path) as f:
            return fill(f)
    except AtomicWriteError as exc:
        raise ExportError(f"cannot write {exc}") from exc
    except OSError as exc:
        raise ExportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc


def export_alpaca(records_path: str | Path, out_path: str | Path) -> int:
    """Write the records as an Alpaca JSON list; returns how many examples."""
    source = Path(records_path)

    def fill(f: TextIO) -> int:
        count = 0
        f.write("[")
        for instruction, given, output in _examples(source):
            item: dict[str, Any] = {"instruction": instruction, "input": given, "output": output}
            f.write(("\n  " if count == 0 else ",\n  ") + json.dumps(item, ensure_ascii=False))
            count += 1
        f.write("\n]\n" if count else "]\n")
        return count

    return _atomic_write(Path(out_path), source, fill)


def export_chat(records_path: str | Path, out_path: str | Path) -> int:
    """Write the records as chat-messages JSON Lines; returns how many examples."""
    source = Path(records_path)

    def fill(f: TextIO) -> int:
        count = 0
        for instruction, given, output in _examples(source):
            user = instruction + ("\n\n" + given if given else "")
            item = {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": output},
                ]
            }
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            count += 1
        return count

    return _atomic_write(Path(out_path), source, fill)
