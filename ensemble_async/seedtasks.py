"""Seed tasks in Self-Instruct's ``seed_tasks.jsonl`` format, and the project's own set.

Each line of a seed file is one JSON object::

    {"id": "...", "name": "...", "instruction": "...",
     "instances": [{"input": "...", "output": "..."}], "is_classification": false}

Blank lines are skipped. Fields other than these five are ignored. Every seed in
Self-Instruct's file has exactly one instance; this loader accepts one or more and keeps
the first (the others are still checked). A seed is of kind ``"input_output"`` (type A)
when its first instance's input is not the empty string, else of kind ``"output"``
(type B) -- the same split rule as the reference code.

Anything malformed raises :class:`SeedFormatError`, which names the file, the line and
what is wrong. :func:`load_seed_tasks` with no path reads the seeds shipped in the wheel
(``ensemble_async.seeds/seed_tasks.jsonl``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeAlias

__all__ = [
    "KINDS",
    "SHIPPED_SEEDS",
    "SeedFormatError",
    "SeedTask",
    "TaskKind",
    "load_seed_tasks",
    "parse_seed_tasks",
    "split_by_kind",
]

TaskKind: TypeAlias = Literal["input_output", "output"]
"""``"input_output"``: the task needs an input (type A); ``"output"``: it does not (type B)."""

KINDS: tuple[TaskKind, TaskKind] = ("input_output", "output")

SHIPPED_SEEDS = "seed_tasks.jsonl"
"""Name of the project's seed file inside the ``ensemble_async.seeds`` package."""

_SEED_PACKAGE = "ensemble_async.seeds"

# Fields that must be strings, in the order they are checked.
_STR_FIELDS = ("id", "name", "instruction")


class SeedFormatError(ValueError):
    """A seed file that does not follow the Self-Instruct format.

    ``source`` is the file (or a label for in-memory text), ``line`` the 1-based line
    number (``None`` when the problem is the file as a whole) and ``reason`` what is wrong.
    """

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class SeedTask:
    """One seed task: an instruction with one worked instance."""

    id: str
    name: str
    instruction: str
    input: str
    output: str
    is_classification: bool

    @property
    def kind(self) -> TaskKind:
        """``"input_output"`` when the instance has a non-empty input, else ``"output"``."""
        return "input_output" if self.input != "" else "output"

    def to_record(self) -> dict[str, Any]:
        """This task as one Self-Instruct line (a JSON-serialisable dict)."""
        return {
            "id": self.id,
            "name": self.name,
            "instruction": self.instruction,
            "instances": [{"input": self.input, "output": self.output}],
            "is_classification": self.is_classification,
        }


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _parse_record(record: Mapping[str, Any], source: str, line: int) -> SeedTask:
    def fail(reason: str) -> SeedFormatError:
        return SeedFormatError(source, line, reason)

    for key in (*_STR_FIELDS, "instances", "is_classification"):
        if key not in record:
            raise fail(f"missing field {key!r}")
    for key in _STR_FIELDS:
        if not isinstance(record[key], str):
            raise fail(f"field {key!r} must be a string, got {_type_name(record[key])}")
    if record["id"] == "":
        raise fail("field 'id' is empty")
    if record["instruction"].strip() == "":
        raise fail("field 'instruction' is empty")
    is_cls = record["is_classification"]
    if not isinstance(is_cls, bool):
        raise fail(f"field 'is_classification' must be a boolean, got {_type_name(is_cls)}")
    instances = record["instances"]
    if not isinstance(instances, list):
        raise fail(f"field 'instances' must be a list, got {_type_name(instances)}")
    if not instances:
        raise fail("field 'instances' is empty (a seed needs at least one instance)")
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise fail(f"instances[{i}] must be an object, got {_type_name(inst)}")
        for key in ("input", "output"):
            if key not in inst:
                raise fail(f"instances[{i}] is missing field {key!r}")
            if not isinstance(inst[key], str):
                raise fail(f"instances[{i}].{key} must be a string, got {_type_name(inst[key])}")
    first = instances[0]
    return SeedTask(
        id=record["id"],
        name=record["name"],
        instruction=record["instruction"],
        input=first["input"],
        output=first["output"],
        is_classification=is_cls,
    )


def parse_seed_tasks(text: str, source: str = "<string>") -> list[SeedTask]:
    """Parse seed tasks from the text of a Self-Instruct seed file.

    ``source`` only labels error messages. Raises :class:`SeedFormatError` on bad JSON,
    a line that is not an object, text that is not valid Unicode (a lone surrogate
    escape), a missing or mistyped field, an empty id or instruction, no instances, a
    duplicate id, or when there is no task at all.
    """
    tasks: list[SeedTask] = []
    first_line: dict[str, int] = {}
    # Split on "\n" only: str.splitlines() would also break on U+2028 and friends, which
    # json.dumps(..., ensure_ascii=False) leaves raw inside strings.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if raw.strip() == "":
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SeedFormatError(source, lineno, f"invalid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise SeedFormatError(
                source, lineno, f"expected a JSON object, got {_type_name(record)}"
            )
        try:  # an escape such as "\ud83d" alone is half a character: no text can hold it
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise SeedFormatError(
                source, lineno, "a lone surrogate escape (\\ud800-\\udfff) is not valid Unicode"
            ) from None
        task = _parse_record(record, source, lineno)
        if task.id in first_line:
            raise SeedFormatError(
                source,
                lineno,
                f"duplicate id {task.id!r} (first seen on line {first_line[task.id]})",
            )
        first_line[task.id] = lineno
        tasks.append(task)
    if not tasks:
        raise SeedFormatError(source, None, "no seed tasks found")
    return tasks


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Load seed tasks from a Self-Instruct ``seed_tasks.jsonl``-style file.

    With ``path=None`` the project's shipped seeds are read from the installed package.
    """
    if path is None:
        source = f"{_SEED_PACKAGE}/{SHIPPED_SEEDS}"
        data = resources.files(_SEED_PACKAGE).joinpath(SHIPPED_SEEDS).read_bytes()
    else:
        source = str(path)
        data = _read_bounded(Path(path), source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SeedFormatError(source, line, "not valid UTF-8") from exc
    return parse_seed_tasks(text, source)


MAX_LINE_BYTES = 1 << 20
"""Longest seed line read (1 MiB; a seed is a short task description)."""


def _read_bounded(path: Path, source: str) -> bytes:
    """The file's bytes, refusing a line longer than :data:`MAX_LINE_BYTES` (named by
    file:line) without reading the rest of it into memory."""
    lines: list[bytes] = []
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                raise SeedFormatError(source, lineno, f"line longer than {MAX_LINE_BYTES} bytes")
            lines.append(line)
    return b"".join(lines)


def split_by_kind(tasks: Iterable[SeedTask]) -> dict[TaskKind, list[SeedTask]]:
    """Group tasks by :attr:`SeedTask.kind`, keeping their order.

    Both kinds are always present as keys (possibly with an empty list).
    """
    groups: dict[TaskKind, list[SeedTask]] = {kind: [] for kind in KINDS}
    for task in tasks:
        groups[task.kind].append(task)
    return groups
