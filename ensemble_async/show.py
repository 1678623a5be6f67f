"""``python -m ensemble_async show RECORDS``: a few records with their candidates and decision.

``RECORDS`` is a records file or its run directory.  Without ``--seed`` the first ``N``
records are shown, with ``--seed S`` a uniform sample of ``N`` (the same ``S`` shows the
same records); ``--rejects`` shows rejects instead, each with its reason and what it
means.  The file is read once, line by line, whatever its size.  Output goes to a rich
console (a table per record); it never changes a file.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .reasons import describe
from .records import RecordFileError, read_records
from .report import ReportError, find_run_files

__all__ = ["add_show_parser", "pick", "render_record", "run_show"]

EXIT_OK, EXIT_USAGE = 0, 2


def pick(items: Iterator[dict[str, Any]], n: int, seed: int | None) -> list[dict[str, Any]]:
    """The first ``n`` items, or (with ``seed``) a uniform sample of ``n`` in file order."""
    if seed is None:
        out: list[dict[str, Any]] = []
        for item in items:
            if len(out) >= n:
                break
            out.append(item)
        return out
    rng = random.Random(seed)
    sample: list[tuple[int, dict[str, Any]]] = []
    for seen, item in enumerate(items):
        if len(sample) < n:
            sample.append((seen, item))
        else:
            j = rng.randrange(seen + 1)
            if j < n:
                sample[j] = (seen, item)
    return [item for _, item in sorted(sample, key=lambda pair: pair[0])]


def _text(value: Any) -> Text:
    return Text("" if value is None else str(value))


def render_record(record: dict[str, Any]) -> Panel:
    """One record or reject: its fields, its candidates (the kept one marked) and decision."""
    prov = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    assert isinstance(prov, dict)
    decision = prov.get("decision") if isinstance(prov.get("decision"), dict) else {}
    assert isinstance(decision, dict)
    fields = Table.grid(padding=(0, 1))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    reason = record.get("reason")
    if isinstance(reason, str):
        meaning = describe(reason)
        fields.add_row("reason", _text(f"{record.get('stage')}: {reason}"))
        if meaning is not None:
            fields.add_row("", Text(meaning.text, style="dim"))
    for key in ("instruction", "input", "output", "text", "error"):
        if record.get(key):
            fields.add_row(key, _text(record[key]))
    parts: list[Any] = [fields]
    candidates = prov.get("candidates")
    if isinstance(candidates, list) and candidates:
        table = Table(show_lines=False, expand=True)
        for column in ("#", "member", "status", "candidate"):
            table.add_column(column, overflow="fold")
        kept = decision.get("index")
        for c in candidates:
            if not isinstance(c, dict):
                continue
            mark = " (kept)" if kept is not None and c.get("index") == kept else ""
            text = c.get("text") if isinstance(c.get("text"), str) else c.get("error")
            table.add_row(
                _text(c.get("index")),
                _text(c.get("source")),
                _text(f"{c.get('status')}{mark}"),
                _text(text),
                style="green" if mark else None,
            )
        parts.append(table)
    if decision:
        rule = decision.get("rule")
        line = f"decision: rule {rule}"
        if decision.get("min_pairwise") is not None:
            line += f", lowest pairwise {decision['min_pairwise']:.3f}"
        if decision.get("threshold") is not None:
            line += f", threshold {decision['threshold']}"
        parts.append(Text(line))
        meaning = describe(str(rule))
        if meaning is not None:
            parts.append(Text(meaning.text, style="dim"))
    title = f"{record.get('id')} ({record.get('type') or '-'})"
    return Panel(Group(*parts), title=title, title_align="left")


def add_show_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``show`` on an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "show", help="print records (or rejects) with their candidates and decision"
    )
    p.add_argument("records", type=Path, metavar="RECORDS", help="records file or run directory")
    p.add_argument("-n", type=int, default=5, help="how many (default 5)")
    p.add_argument("--rejects", action="store_true", help="show rejects instead of records")
    p.add_argument(
        "--seed", type=int, help="a uniform sample with this seed (default: the first N)"
    )
    return p


def run_show(args: argparse.Namespace, console: Console) -> int:
    """``show``: exit 0, or 2 for bad input."""
    err = Console(stderr=True)

    def fail(message: str) -> int:
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        return EXIT_USAGE

    if args.n < 1:
        return fail(f"-n must be >= 1, got {args.n}")
    try:
        files = find_run_files(args.records)
    except ReportError as exc:
        return fail(str(exc))
    path = files.records
    if args.rejects:
        if files.rejects is None:
            return fail(f"no rejects file beside {files.records}")
        path = files.rejects
    try:
        chosen = pick(read_records(path), args.n, args.seed)
    except RecordFileError as exc:
        return fail(str(exc))
    for record in chosen:
        console.print(render_record(record))
    what = "rejects" if args.rejects else "records"
    console.print(f"{len(chosen)} {what} from {path}", highlight=False, soft_wrap=True)
    return EXIT_OK
