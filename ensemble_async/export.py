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

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from .atomicfile import AtomicWriteError, replacing
from .records import RecordFileError, read_records

__all__ = [
    "ExportError",
    "export_alpaca",
    "export_chat",
    "export_hf",
    "export_messages",
    "export_parquet",
    "export_prompt_completion",
    "messages_of",
    "push_to_hub",
    "record_from_row",
    "reject_row",
    "train_row",
    "write_text_atomic",
]


class ExportError(Exception):
    """The records cannot be read or exported, or the output cannot be written."""


def _examples(records_path: Path) -> Iterator[tuple[str, str, str]]:
    """(instruction, input, output) of each record."""
    for _, instruction, given, output in _id_examples(records_path):
        yield instruction, given, output


def _atomic_write(out_path: Path, source: Path | None, fill: Callable[[TextIO], int]) -> int:
    if source is not None and out_path.resolve() == source.resolve():
        raise ExportError(f"refusing to export {source} onto itself")
    try:
        with replacing(out_path) as f:
            return fill(f)
    except AtomicWriteError as exc:
        raise ExportError(f"cannot write {exc}") from exc
    except OSError as exc:
        raise ExportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc


def write_text_atomic(out_path: str | Path, text: str) -> None:
    """Replace ``out_path`` with ``text`` atomically (ExportError names the path on failure)."""

    def fill(f: TextIO) -> int:
        f.write(text)
        return 1

    _atomic_write(Path(out_path), None, fill)


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


# -- TRL's formats --------------------------------------------------------------------


def _user_turn(instruction: str, given: str) -> str:
    return instruction + ("\n\n" + given if given else "")


def _id_examples(records_path: Path) -> Iterator[tuple[str, str, str, str]]:
    """(id, instruction, input, output) of each record."""
    try:
        for record in read_records(records_path):
            instruction, given, output = _fields(records_path, record)
            yield record["id"], instruction, given, output
    except RecordFileError as exc:
        raise ExportError(str(exc)) from exc


def _fields(records_path: Path, record: dict[str, Any]) -> tuple[str, str, str]:
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
    return instruction, given, output


def messages_of(
    instruction: str, given: str, output: str, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The chat turns of one example (TRL's conversational format)."""
    turns = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    turns.append({"role": "user", "content": _user_turn(instruction, given)})
    turns.append({"role": "assistant", "content": output})
    return turns


def export_messages(
    records_path: str | Path, out_path: str | Path, *, system_prompt: str | None = None
) -> int:
    """JSON Lines of ``{"id", "messages"}`` (TRL's conversational format; an optional
    system turn first); returns how many examples."""
    source = Path(records_path)

    def fill(f: TextIO) -> int:
        count = 0
        for rid, instruction, given, output in _id_examples(source):
            item = {"id": rid, "messages": messages_of(instruction, given, output, system_prompt)}
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            count += 1
        return count

    return _atomic_write(Path(out_path), source, fill)


def export_prompt_completion(records_path: str | Path, out_path: str | Path) -> int:
    """JSON Lines of ``{"id", "prompt", "completion"}`` (TRL's standard prompt-completion
    format: the prompt is the user turn's text); returns how many examples."""
    source = Path(records_path)

    def fill(f: TextIO) -> int:
        count = 0
        for rid, instruction, given, output in _id_examples(source):
            item = {"id": rid, "prompt": _user_turn(instruction, given), "completion": output}
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            count += 1
        return count

    return _atomic_write(Path(out_path), source, fill)


# -- columnar formats: Parquet and a datasets.DatasetDict ------------------------------

TOP_COLUMNS = ("id", "type", "instruction", "input", "output")
PROVENANCE_COLUMNS: dict[str, type] = {
    "writer": str,
    "preset": str,
    "seed": int,
    "instruction_attempt": int,
    "instruction_index": int,
    "novelty_max_rouge": float,
}
_ABSENT = "_absent_keys"
REJECT_COLUMNS = ("id", "stage", "reason", "type", "instruction", "input", "text")
_BATCH = 5_000


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _json(value: Any) -> str | None:
    return None if value in (None, {}) else json.dumps(value, ensure_ascii=False)


def train_row(
    records_path: Path, record: dict[str, Any], system_prompt: str | None = None
) -> dict[str, Any]:
    """One kept record as a row: the example, its chat turns, provenance scalars as
    columns, candidates and decision as JSON text, and everything else (provenance keys
    and top-level keys not given a column) in ``provenance_extra`` and ``extra`` -- so
    :func:`record_from_row` gives the record back exactly."""
    instruction, given, output = _fields(records_path, record)
    row: dict[str, Any] = {"id": record["id"], "instruction": instruction, "input": given}
    row["output"] = output
    row["type"] = record["type"] if isinstance(record.get("type"), str) else None
    row["messages"] = messages_of(instruction, given, output, system_prompt)
    extra = {k: v for k, v in record.items() if k not in (*TOP_COLUMNS, "provenance")}
    for key in ("type", "input"):
        if key in record and record[key] != row[key]:
            extra[key] = record[key]  # e.g. an input of null, exported as ""
    if "input" not in record:
        extra[_ABSENT] = ["input"]  # exported as "", given back absent
    prov = record.get("provenance")
    if "provenance" in record and not isinstance(prov, dict):
        extra["provenance"] = prov
    prov = prov if isinstance(prov, dict) else {}
    rest = dict(prov)
    for key, kind in PROVENANCE_COLUMNS.items():
        value = rest.get(key)
        if value is not None and _fits(value, kind):
            row[key] = float(value) if kind is float else value
            if kind is float and isinstance(value, int):
                continue  # an int score stays in provenance_extra, so it comes back an int
            del rest[key]
        else:
            row[key] = None
    decision = rest.get("decision")
    decision = decision if isinstance(decision, dict) else {}
    row["decision_rule"] = decision.get("rule") if isinstance(decision.get("rule"), str) else None
    kept = decision.get("index")
    row["kept_candidate"] = kept if _fits(kept, int) else None
    low = decision.get("min_pairwise")
    row["min_pairwise"] = float(low) if low is not None and _fits(low, float) else None
    row["candidates"] = _json(rest.pop("candidates", None))
    row["decision"] = _json(rest.pop("decision", None))
    row["provenance_extra"] = _json(rest) if rest or "provenance" in record else None
    row["extra"] = _json(extra)
    return row


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The record a :func:`train_row` row was made from."""
    record: dict[str, Any] = {k: row[k] for k in TOP_COLUMNS if row.get(k) is not None}
    if row.get("provenance_extra") is not None or row.get("candidates") or row.get("decision"):
        prov: dict[str, Any] = {k: row[k] for k in PROVENANCE_COLUMNS if row.get(k) is not None}
        if row.get("candidates") is not None:
            prov["candidates"] = json.loads(row["candidates"])
        if row.get("decision") is not None:
            prov["decision"] = json.loads(row["decision"])
        if row.get("provenance_extra") is not None:
            prov.update(json.loads(row["provenance_extra"]))
        record["provenance"] = prov
    if row.get("extra") is not None:
        record.update(json.loads(row["extra"]))
        for key in record.pop(_ABSENT, []):
            record.pop(key, None)
    return record


def reject_row(reject: dict[str, Any]) -> dict[str, Any]:
    """One reject line as a row: its common fields as columns, the rest as JSON ``detail``."""
    row = {k: reject.get(k) if isinstance(reject.get(k), str) else None for k in REJECT_COLUMNS}
    rest = {k: v for k, v in reject.items() if k not in REJECT_COLUMNS or row[k] != v}
    row["detail"] = _json(rest)
    return row


def _schemas() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
    except ImportError as exc:  # pragma: no cover - datasets brings pyarrow
        raise ExportError(
            "Parquet and Hub exports need pyarrow: pip install 'ensemble-async[dev]'"
        ) from exc
    s = pa.string()
    message = pa.struct([("role", s), ("content", s)])
    train = pa.schema(
        [(k, s) for k in TOP_COLUMNS]
        + [("messages", pa.list_(message))]
        + [
            (k, pa.string() if t is str else pa.int64() if t is int else pa.float64())
            for k, t in PROVENANCE_COLUMNS.items()
        ]
        + [("decision_rule", s), ("kept_candidate", pa.int64()), ("min_pairwise", pa.float64())]
        + [(k, s) for k in ("candidates", "decision", "provenance_extra", "extra")]
    )
    rejects = pa.schema([(k, s) for k in (*REJECT_COLUMNS, "detail")])
    return train, rejects


def _write_parquet(out_path: Path, schema: Any, rows: Iterator[dict[str, Any]]) -> int:
    """Stream ``rows`` into a Parquet file in batches; atomic replace; returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
        os.close(fd)
    except OSError as exc:
        raise ExportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    count = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) >= _BATCH:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count += len(batch)
                    batch = []
            if batch or count == 0:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
        raise
    return count


def _train_rows(source: Path, system_prompt: str | None) -> Iterator[dict[str, Any]]:
    try:
        for record in read_records(source):
            yield train_row(source, record, system_prompt)
    except RecordFileError as exc:
        raise ExportError(str(exc)) from exc


def _reject_rows(source: Path) -> Iterator[dict[str, Any]]:
    try:
        for reject in read_records(source):
            yield reject_row(reject)
    except RecordFileError as exc:
        raise ExportError(str(exc)) from exc


def export_parquet(
    records_path: str | Path,
    out_path: str | Path,
    *,
    rejects_path: str | Path | None = None,
    system_prompt: str | None = None,
) -> dict[str, int]:
    """The kept records as one Parquet file (columns of :func:`train_row`); with
    ``rejects_path``, the rejects beside it as ``<stem>.rejects.parquet``.  Returns the
    row count per split."""
    source, out = Path(records_path), Path(out_path)
    if out.resolve() == source.resolve():
        raise ExportError(f"refusing to export {source} onto itself")
    train_schema, rejects_schema = _schemas()
    counts = {"train": _write_parquet(out, train_schema, _train_rows(source, system_prompt))}
    if rejects_path is not None:
        target = out.with_name(f"{out.stem}.rejects.parquet")
        counts["rejects"] = _write_parquet(target, rejects_schema, _reject_rows(Path(rejects_path)))
    return counts


def export_hf(
    records_path: str | Path,
    out_dir: str | Path,
    *,
    rejects_path: str | Path | None = None,
    system_prompt: str | None = None,
    card: Callable[[dict[str, int]], str] | None = None,
) -> dict[str, int]:
    """A ``datasets.DatasetDict`` saved with ``save_to_disk`` into ``out_dir``: split
    ``train`` (the kept records, columns of :func:`train_row`) and, with ``rejects_path``,
    ``rejects``.  ``card(counts)`` returns the README.md written beside the data.

    Built in a temporary folder beside ``out_dir`` (the data streams through Parquet, so
    memory stays bounded) and swapped in at the end; an existing ``out_dir`` is replaced
    only when it is empty or a previous dataset export.  Returns the row count per split.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ExportError(
            "the hf format needs datasets: pip install 'ensemble-async[dev]'"
        ) from exc
    source, out = Path(records_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_dataset(out))):
        raise ExportError(f"{out} exists and is not a dataset export; refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        parquet = work / "parquet" / "train.parquet"
        counts = export_parquet(
            source, parquet, rejects_path=rejects_path, system_prompt=system_prompt
        )
        cache = str(work / "cache")
        splits = {"train": parquet}
        if rejects_path is not None:
            splits["rejects"] = parquet.with_name("train.rejects.parquet")
        dd = datasets.DatasetDict(
            {
                name: datasets.Dataset.from_parquet(str(path), cache_dir=cache)
                for name, path in splits.items()
            }
        )
        staged = work / "dataset"
        dd.save_to_disk(str(staged))
        if card is not None:
            (staged / "README.md").write_text(card(counts), encoding="utf-8")
        _swap_in(staged, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts


def _is_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file()


def _swap_in(staged: Path, out: Path) -> None:
    """Put ``staged`` at ``out``; a previous ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def push_to_hub(out_dir: str | Path, repo: str, *, token: str, private: bool = False) -> str:
    """Upload a dataset saved by :func:`export_hf` with ``datasets``' own ``push_to_hub``
    (the Hub's address comes from ``HF_ENDPOINT``); its README.md goes up first so the
    dataset card carries ``datasets``' metadata merged into ours.  The records are config
    ``default`` (split ``train``), the rejects config ``rejects`` (split ``train``): a
    Hub config holds one set of columns.  Returns the repo id.
    Errors never carry the token."""
    import datasets
    from huggingface_hub import HfApi

    folder = Path(out_dir)
    try:
        api = HfApi(token=token, endpoint=os.environ.get("HF_ENDPOINT") or None)
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        card = folder / "README.md"
        if card.is_file():
            api.upload_file(
                path_or_fileobj=str(card),
                path_in_repo="README.md",
                repo_id=repo,
                repo_type="dataset",
                commit_message="Dataset card (ensemble-async)",
            )
        dd = datasets.load_from_disk(str(folder))
        # One Hub config per column set: records in "default", rejects in "rejects".
        dd["train"].push_to_hub(repo, split="train", token=token, private=private)
        if "rejects" in dd:
            dd["rejects"].push_to_hub(
                repo, config_name="rejects", split="train", token=token, private=private
            )
    except Exception as exc:
        message = str(exc).replace(token, "***") if token else str(exc)
        raise ExportError(f"push to {repo} failed: {type(exc).__name__}: {message}") from None
    return repo


# -- command line ---------------------------------------------------------------------

FORMATS = ("alpaca", "chat", "messages", "prompt-completion", "parquet", "hf")
EXIT_OK, EXIT_USAGE, EXIT_OUTPUT = 0, 2, 4  # the documented exit codes of the runner


def _license_arg(text: str) -> tuple[str, str]:
    import argparse

    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MEMBER=LICENCE")
    return name, value


def add_export_parser(subparsers: Any) -> Any:
    """Register ``export`` on an ``argparse`` subparsers object."""
    from pathlib import Path as _Path

    p = subparsers.add_parser(
        "export", help="export records to training formats or a Hub-ready dataset"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="alpaca (JSON list), chat (messages JSONL), messages (TRL conversational "
        "JSONL with ids), prompt-completion (TRL JSONL with ids), parquet (one file), "
        "hf (a datasets.DatasetDict folder with a dataset card)",
    )
    p.add_argument("input", type=_Path, help="records JSONL")
    p.add_argument("output", type=_Path, help="output file (hf: output folder)")
    p.add_argument(
        "--system-prompt", help="a system turn first in messages (messages, parquet, hf)"
    )
    p.add_argument(
        "--with-rejects",
        action="store_true",
        help="parquet/hf: add the rejects (a 'rejects' split or <stem>.rejects.parquet)",
    )
    p.add_argument("--rejects", type=_Path, help="rejects file (default: beside the records)")
    p.add_argument(
        "--push-to-hub", metavar="REPO", help="hf: upload to this dataset repo (HF_TOKEN)"
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.add_argument("--license", default="other", help="the dataset card's licence (default: other)")
    p.add_argument(
        "--model-license",
        type=_license_arg,
        action="append",
        default=[],
        metavar="MEMBER=LICENCE",
        help="a member's model licence for the card (repeatable)",
    )
    return p


def run_export(args: Any, console: Any) -> int:
    """``export``: exit 0; 2 for bad input or options; 4 when the output cannot be written
    or the push fails."""
    from rich.console import Console

    from .records import default_rejects_path

    err = Console(stderr=True)

    def fail(message: str, code: int) -> int:
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        return code

    fmt: str = args.format
    if not args.input.is_file():
        return fail(f"{args.input}: file not found", EXIT_USAGE)
    if fmt not in ("parquet", "hf") and (args.with_rejects or args.rejects):
        return fail("--with-rejects/--rejects go with --format parquet or hf", EXIT_USAGE)
    if args.push_to_hub and fmt != "hf":
        return fail("--push-to-hub goes with --format hf", EXIT_USAGE)
    if args.system_prompt is not None and fmt in ("alpaca", "chat", "prompt-completion"):
        return fail(f"--system-prompt has no place in the {fmt} format", EXIT_USAGE)
    token = os.environ.get("HF_TOKEN", "")
    if args.push_to_hub and not token:
        return fail("--push-to-hub needs a Hub token in the HF_TOKEN environment variable", 2)
    rejects: Path | None = None
    if args.with_rejects or args.rejects:
        rejects = args.rejects or default_rejects_path(args.input)
        if not rejects.is_file():
            return fail(f"{rejects}: rejects file not found", EXIT_USAGE)
    try:
        if fmt == "alpaca":
            counts = {"train": export_alpaca(args.input, args.output)}
        elif fmt == "chat":
            counts = {"train": export_chat(args.input, args.output)}
        elif fmt == "messages":
            counts = {
                "train": export_messages(args.input, args.output, system_prompt=args.system_prompt)
            }
        elif fmt == "prompt-completion":
            counts = {"train": export_prompt_completion(args.input, args.output)}
        elif fmt == "parquet":
            counts = export_parquet(
                args.input, args.output, rejects_path=rejects, system_prompt=args.system_prompt
            )
        else:
            counts = _export_hf_with_card(args, rejects)
    except ExportError as exc:
        return fail(str(exc), EXIT_USAGE)
    shown = ", ".join(f"{name} {n}" for name, n in counts.items())
    console.print(f"{shown} examples -> {args.output} ({fmt})", highlight=False)
    if args.push_to_hub:
        try:
            push_to_hub(args.output, args.push_to_hub, token=token, private=args.private)
        except ExportError as exc:
            return fail(str(exc), EXIT_OUTPUT)
        console.print(f"pushed to {args.push_to_hub}", highlight=False)
    return EXIT_OK


def _export_hf_with_card(args: Any, rejects: Path | None) -> dict[str, int]:
    from .card import dataset_card
    from .report import ReportError, build_report, find_run_files

    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()  # the command prints its own one-line result

    try:
        report = build_report(find_run_files(args.input, rejects=rejects))
    except ReportError as exc:
        raise ExportError(str(exc)) from exc

    def card(counts: dict[str, int]) -> str:
        return dataset_card(
            report,
            counts,
            license=args.license,
            model_licenses=dict(args.model_license),
            repo=args.push_to_hub,
            system_prompt=args.system_prompt,
        )

    return export_hf(
        args.input, args.output, rejects_path=rejects, system_prompt=args.system_prompt, card=card
    )
