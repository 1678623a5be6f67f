"""``python -m ensemble_async``: the command-line runner.

Layer: the top.  This module parses arguments, calls ``ensemble_async.assemble`` (which
builds everything a command runs with) and prints; it builds no backend or member
itself.

Subcommands:

* ``ask [PROMPT] [--member KIND[=URL_OR_MODEL][,key=value...]]``: one prompt through the
  ensemble (the default command);
* ``generate [--config X.toml] [--quiet | --log-jsonl PATH] [--output PATH] [--limit N]``:
  the Ensemble-Instruct pipeline (without ``--config``: the embedded default, two local
  models); resumable: rerun the same command after a crash and it continues;
* ``check --config X.toml``: reach every configured backend (health, model served,
  latency of a 1-token request);
* ``consensus IN.jsonl [--out OUT.jsonl] [--threshold T]``: re-run step 5 on lines
  that carry ``candidates``;
* ``export --format alpaca|chat|messages|prompt-completion|parquet|hf IN OUT``: records
  to training formats or a Hub-ready dataset (``ensemble_async.export``);
* ``report OUTPUT``: report.html and report.json about a run (``ensemble_async.report``);
* ``show RECORDS [-n N] [--rejects] [--seed S]``: records with their candidates and
  decision (``ensemble_async.show``);
* ``backends``: the registered backend kinds.

Exit codes: 0 success; 1 unexpected internal error; 2 bad usage, configuration or input
(the message names the file, key or line; also a rerun whose run manifest differs); 3 a
backend cannot serve (``check``, the probe before ``generate``) or every backend failed;
4 the output cannot be written (full disk, read-only, not creatable); 5 items deferred (a
member was unavailable: rerun the same command when it is back); 6 the output is locked
by another run; 7 the output is not a records file (or not a regular file); 8 the
records file is corrupt (a bad line before its last); 130 interrupted (Ctrl-C or SIGTERM,
any subcommand: the run is cancelled, finished records are on disk, sessions are closed,
no half-written file is left).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib.util
import json
import math
import os
import select as _select
import signal
import sys
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .assemble import (
    MemberCannotServe,
    Probe,
    ask_ensemble,
    check,
    embedded_config,
    load_seeds,
    open_run,
)
from .atomicfile import AtomicWriteError, write_text
from .config import (
    BackendConfig,
    Config,
    ConfigError,
    OutputError,
    check_distinct_files,
    check_environment,
    check_output_writable,
    load_config,
    member_configs,
    output_path,
)
from .consensus import select
from .manifest import ManifestError
from .member import Member
from .progress import Mode, Progress
from .records import RecordFileError
from .registry import ALIASES, backend_kinds
from .runner import run as run_loop
from .runner import tune_gc
from .seedtasks import SeedTask
from .types import ChatMessage, GenerationRequest

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BACKENDS_FAILED = 3
EXIT_OUTPUT = 4
EXIT_DEFERRED = 5
EXIT_OUTPUT_LOCKED = 6
EXIT_NOT_RECORDS = 7
EXIT_CORRUPT_RECORDS = 8
EXIT_INTERRUPTED = 130

DEFAULT_PROMPT = "Give three short tips for writing clear instructions."
MAX_CANDIDATES = 1024
"""Most candidates ``consensus`` accepts on one line (pairwise ROUGE-L is quadratic)."""

_T = TypeVar("_T")


class UsageError(Exception):
    """Bad command-line input; the message names what is wrong."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` runs (temporary files removed,
    sessions closed) and the command exits 130."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """``runner.run`` (uvloop's event loop when installed) with SIGTERM cancelling the
    main task (like Ctrl-C does), so the run unwinds through its ``async with`` blocks;
    ``asyncio.CancelledError`` comes out."""

    async def guarded() -> _T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        installed = False
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
                installed = True
        try:
            return await coro
        finally:
            if installed:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(signal.SIGTERM)
                # remove_signal_handler resets to the default action; keep ours
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, _on_sigterm)

    return run_loop(guarded(), gc_tuning=False)  # the program's entry tunes it, once


# ----------------------------------------------------------------------------- ask


def _request(args: argparse.Namespace) -> GenerationRequest:
    try:
        return GenerationRequest(
            messages=(ChatMessage("user", args.prompt),) if args.chat else None,
            prompt=None if args.chat else args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def member_specs(args: argparse.Namespace) -> list[BackendConfig]:
    """The ``--member`` options, or every backend of the embedded default (this may
    assemble a model file: call it before the event loop starts)."""
    if args.member:
        return member_configs(args.member)
    return list(_embedded().backends.values())


def _check_ask(args: argparse.Namespace) -> None:
    if args.attempts < 1:
        raise UsageError(f"--attempts must be >= 1, got {args.attempts}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a number > 0, got {args.timeout}")


async def _run_ask(
    args: argparse.Namespace, console: Console, specs: Sequence[BackendConfig] | None = None
) -> int:
    _check_ask(args)
    specs = member_specs(args) if specs is None else specs
    request = _request(args)
    ensemble = ask_ensemble(specs, attempts=args.attempts, deadline_s=args.timeout)
    async with ensemble:
        result = await ensemble.run(request)

    table = Table(title=f"{len(specs)} members, {result.wall_s:.2f} s", show_lines=True)
    for column in ("#", "member", "candidate", "finish", "tokens", "latency"):
        table.add_column(column)
    for c in result.candidates:
        if c.completion is None:
            table.add_row(
                str(c.index),
                escape(c.source),
                "[red]" + escape(f"{c.status}: {c.error or ''}") + "[/red]",
                "-",
                "-",
                "-",
            )
            continue
        done = c.completion
        mark = " [green](kept)[/green]" if result.decision.index == c.index else ""
        table.add_row(
            str(c.index),
            escape(c.source) + mark,
            escape(done.text.strip()),
            done.finish_reason,
            f"{done.prompt_tokens}+{done.completion_tokens}",
            f"{done.latency_s:.2f}s",
        )
    console.print(f"[bold]prompt:[/bold] {escape(args.prompt)}")
    console.print(table)
    selection = result.decision.selection
    if result.kept:
        console.print(f"consensus: kept candidate {selection.index} (rule {selection.rule})")
    else:
        console.print(f"consensus: nothing kept (rule {selection.rule})")
    if all(c.completion is None for c in result.candidates):
        console.print("[red]every member failed[/red]")
        return EXIT_BACKENDS_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------- generate


def _embedded() -> Config:
    try:
        return embedded_config()
    except FileNotFoundError as exc:  # MissingModelError says which package to install
        raise UsageError(str(exc)) from None


def _load(args: argparse.Namespace) -> Config:
    """The config named by ``--config``, else the embedded default.  The default resolves
    (and may assemble) the model files: this runs before the event loop starts."""
    if args.config is not None:
        return load_config(args.config)
    return _embedded()


def _progress_mode(args: argparse.Namespace, err: Console) -> tuple[Mode, Path | None]:
    """The progress mode and the ``--log-jsonl`` file (opened only once the run starts,
    so a run refused by the probe leaves no log file either)."""
    if args.log_jsonl is not None:
        if args.log_jsonl == "-":
            return "jsonl", None
        if not args.log_jsonl.strip() or args.log_jsonl.endswith(("/", os.sep)):
            raise UsageError("--log-jsonl: name a file, or '-' for stderr")
        path = Path(args.log_jsonl)
        if path.is_dir():
            raise UsageError(f"--log-jsonl: {path} is a directory")
        return "jsonl", path
    if args.quiet or not err.is_terminal:
        return "quiet", None
    return "rich", None


def run_generate(args: argparse.Namespace, err: Console) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    config = _load(args)
    if args.output is not None:
        config = config.with_output(output_path(args.output, source="--output", key=None))
    if args.limit is not None:
        config = config.with_limit(args.limit)
    if args.ray is not None:
        if importlib.util.find_spec("ray") is None:
            raise UsageError("--ray needs Ray: pip install 'ensemble-async[ray]'")
        config = config.with_ray(args.ray)
    check_environment(config)  # before anything is created on disk
    mode, log_path = _progress_mode(args, err)
    check_distinct_files(config, log=log_path)
    check_output_writable(config)
    seeds = load_seeds(config)
    try:
        return _run_async(generate(config, seeds, mode=mode, console=err, log=log_path))
    except MemberCannotServe as exc:
        for probe in exc.probes:
            err.print(f"[red]error:[/red] {escape(probe.problem())}", highlight=False)
        err.print("nothing was written; fix the member(s) above and rerun", highlight=False)
        return EXIT_BACKENDS_FAILED
    except BaseException as exc:
        storage = storage_failure(exc)
        if storage is None:
            raise
        raise OutputError(
            config.source,
            "run.output",
            f"writing stopped: {storage} (records already written are intact; free "
            "space and rerun the same command to continue)",
        ) from None


@contextlib.contextmanager
def _open_log(path: Path) -> Iterator[TextIO]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("a", encoding="utf-8")
    except OSError as exc:
        raise OutputError("--log-jsonl", None, f"{path}: {exc.strerror or exc}") from None
    with f:
        yield f


async def generate(
    config: Config,
    seeds: Sequence[SeedTask],
    *,
    mode: Mode = "quiet",
    console: Console | None = None,
    log: TextIO | Path | None = None,
) -> int:
    """Run the pipeline for ``config`` (``assemble.open_run`` opens and closes the
    members, cache and record files; this shows progress and the summary).  ``log``:
    where JSON-lines progress goes (a path is opened, for appending, after the probe)."""
    console = console or Console(stderr=True)
    async with open_run(config, seeds=seeds) as run, contextlib.AsyncExitStack() as files:
        stream = files.enter_context(_open_log(log)) if isinstance(log, Path) else log
        progress = Progress(
            mode,
            members=run.members,
            targets={"instructions": sum(config.run.targets.to_dict().values())},
            console=console,
            log=stream,
            prices={n: b.price for n, b in config.backends.items() if b.price is not None},
        )
        if mode == "jsonl":
            progress.log_start(
                config=config.source,
                output=str(config.run.output),
                existing_records=run.sink.count,
                backends=[config.backends[m.name].describe() for m in run.members],
            )
        try:
            async with progress:
                summary = await run.pipeline(seeds, events=progress).run()
        except asyncio.CancelledError:
            progress.summary(status="interrupted")
            raise
        shown = progress.summary(summary)
        await asyncio.to_thread(_complete_summary_file, config, shown)
        if _all_failed(run.members):
            console.print("[red]every backend failed[/red]")
            return EXIT_BACKENDS_FAILED
        if summary.deferred:
            reasons = ", ".join(f"{r} x{n}" for r, n in summary.deferred_reasons.items())
            console.print(
                f"[yellow]{summary.deferred} item(s) deferred[/yellow] ({escape(reasons)}): "
                "rerun the same command once every backend is back"
            )
            return EXIT_DEFERRED
        return EXIT_OK


def _complete_summary_file(config: Config, shown: dict[str, Any]) -> None:
    """Add the members (kind, model; no URL), their token counts, prices and the cost to
    the summary file the pipeline wrote beside the records, so ``report`` has them after
    a plain run (without ``--log-jsonl``)."""
    from .sink import summary_path

    path = summary_path(config.run.output)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no summary written (an interrupted run): nothing to complete
    rows = {str(r.get("name")): r for r in shown.get("backends", [])}
    summary["backends"] = [
        {
            "name": name,
            **{k: v for k, v in b.describe().items() if k in ("kind", "model")},
            "prompt_tokens": rows.get(name, {}).get("prompt_tokens", 0),
            "completion_tokens": rows.get(name, {}).get("completion_tokens", 0),
            **({"cost_usd": rows[name]["cost_usd"]} if "cost_usd" in rows.get(name, {}) else {}),
        }
        for name, b in config.backends.items()
        if name in config.used_backends()
    ]
    prices = {
        n: {"prompt": b.price[0], "completion": b.price[1]}
        for n, b in config.backends.items()
        if b.price is not None
    }
    if prices:
        summary["prices"] = prices
        summary["cost_usd"] = shown.get("cost_usd")
    write_text(path, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def storage_failure(exc: BaseException) -> BaseException | None:
    """The disk-level failure (full disk, quota, read-only, I/O error) behind ``exc``,
    looking through exception groups and causes; None when it is something else."""
    from .cache import CacheError
    from .records import RecordStorageError

    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CacheError | RecordStorageError):
            return current
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            return current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)
    return None


def _all_failed(members: Sequence[Member]) -> bool:
    snaps = [m.snapshot() for m in members]
    # no call succeeded (nor was answered from the cache) and some failed (a member never
    # called because the writer failed counts as failed too)
    answered = sum(s["done"] + s.get("cache_hits", 0) for s in snaps)
    return answered == 0 and any(s["failed"] > 0 for s in snaps)


# ---------------------------------------------------------------------------- check


def run_check(args: argparse.Namespace, console: Console) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a number > 0, got {args.timeout}")
    config = _load(args)
    probes: list[Probe] = _run_async(check(config, timeout=args.timeout))
    table = Table(title=escape(f"{config.source}: {len(probes)} backends"))
    for column in ("backend", "kind", "target", "health", "model", "1-token latency", "error"):
        table.add_column(column)
    for p in probes:
        health = "[green]ok[/green]" if p.healthy else f"[red]down[/red] {escape(p.health_detail)}"
        table.add_row(
            escape(p.name),
            escape(p.kind),
            escape(p.target),
            health,
            escape(p.model or "-"),
            "-" if p.latency_s is None else f"{p.latency_s:.3f}s",
            escape(p.error or ""),
        )
    console.print(table)
    failed = [p for p in probes if not p.ok]
    for p in failed:
        console.print(p.problem(), highlight=False, soft_wrap=True, markup=False)
    if failed:
        names = escape(", ".join(p.name for p in failed))
        console.print(f"[red]unreachable:[/red] {names}")
        return EXIT_BACKENDS_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------ consensus


def _read_interruptibly(path: Path) -> bytes:
    """The whole of ``path``.  A pipe or FIFO is read in a loop that wakes every half
    second: a signal delivered to another (native) thread of this process only flags
    the main thread, which would otherwise stay blocked in ``read`` and never exit on
    SIGTERM."""
    if path.is_file():
        return path.read_bytes()
    chunks: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            ready, _, _ = _select.select([fd], [], [], 0.5)  # Python checks signals here
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def consensus_lines(path: Path, *, threshold: float) -> list[dict[str, Any]]:
    """Every line of ``path`` with its ``selection`` added; UsageError names file:line.

    A UTF-8 byte-order mark is accepted; bytes that are not UTF-8 name their line."""
    try:
        data = _read_interruptibly(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out: list[dict[str, Any]] = []
    data = data.removeprefix(b"\xef\xbb\xbf")
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{where}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object")
        candidates = obj.get("candidates")
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise UsageError(f"{where}: 'candidates' must be a list of strings")
        if len(candidates) > MAX_CANDIDATES:
            raise UsageError(
                f"{where}: {len(candidates)} candidates, more than the {MAX_CANDIDATES} "
                "one line may hold"
            )
        selection = select(candidates, threshold=threshold)
        out.append({**obj, "selection": {**selection.to_dict(), "text": selection.text}})
    return out


def run_consensus(args: argparse.Namespace, err: Console) -> int:
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    lines = consensus_lines(args.input, threshold=args.threshold)
    payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if args.out is None:
        sys.stdout.write(payload)
        sys.stdout.flush()
    else:
        _write_atomic(args.out, payload)
    kept = sum(1 for line in lines if line["selection"]["kept"])
    err.print(f"{len(lines)} lines, {kept} kept", highlight=False)
    return EXIT_OK


def _write_atomic(path: Path, text: str) -> None:
    try:
        write_text(path, text)
    except AtomicWriteError as exc:
        raise OutputError(str(path), None, str(exc).removeprefix(f"{path}: ")) from None
    except OSError as exc:
        raise OutputError(str(path), None, f"cannot write: {exc.strerror or exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble_async",
        description="Drive several LLM servers or local models as one ensemble.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad usage/config/input, 3 a backend "
        "cannot serve or every backend failed, 4 output not writable, 5 items deferred "
        "(rerun later), 6 output locked by another run, 7 output is not a records file, "
        "8 corrupt records file, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command")
    p_ask = sub.add_parser(
        "ask", help="answer one prompt with every member and print each candidate"
    )
    p_ask.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p_ask.add_argument(
        "--member",
        action="append",
        default=[],
        metavar="KIND[=URL_OR_MODEL][,k=v...]",
        help="an ensemble member (repeatable); default: the two embedded local models",
    )
    p_ask.add_argument("--max-new-tokens", type=int, default=48)
    p_ask.add_argument("--temperature", type=float, default=0.0)
    p_ask.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for all members"
    )
    p_ask.add_argument("--attempts", type=int, default=3, help="attempts per member (retries + 1)")
    p_ask.add_argument("--seed", type=int, default=None)
    p_ask.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the prompt as a chat message (default) or as plain text",
    )
    sub.add_parser("backends", help="list the registered backend kinds")

    p_gen = sub.add_parser(
        "generate", help="generate instruction data (resumable: rerun the same command)"
    )
    p_gen.add_argument(
        "--config", type=Path, help="TOML config (default: the embedded two-model ensemble)"
    )
    p_gen.add_argument("--output", help="records file (overrides run.output)")
    p_gen.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="keep at most N instructions in all (a quick preview; the config is unchanged)",
    )
    p_gen.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="make every member's calls from Ray actors on a cluster: no ADDRESS starts a "
        "local one, 'auto' joins the running one (step 1, the novelty pool, consensus, "
        "records and the cache stay in this process)",
    )
    shown = p_gen.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print only the summary")
    shown.add_argument(
        "--log-jsonl",
        metavar="PATH",
        help="write progress as JSON lines to PATH ('-' for stderr) instead of the live view",
    )

    p_check = sub.add_parser("check", help="reach every configured backend")
    p_check.add_argument("--config", type=Path, help="TOML config (default: embedded)")
    p_check.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per backend and probe"
    )

    p_cons = sub.add_parser("consensus", help="re-run the consensus step on candidate lists")
    p_cons.add_argument("input", type=Path, help="JSONL whose lines carry 'candidates'")
    p_cons.add_argument("--out", type=Path, help="output JSONL (default: stdout)")
    p_cons.add_argument("--threshold", type=float, default=0.01, help="tau (default 0.01)")

    from .export import add_export_parser
    from .report import add_report_parser
    from .show import add_show_parser

    add_export_parser(sub)
    add_report_parser(sub)
    add_show_parser(sub)
    return parser


def _dispatch(args: argparse.Namespace, console: Console, err: Console) -> int:
    if args.command == "backends":
        for kind in backend_kinds():
            alias = ALIASES.get(kind)
            console.print(kind if alias is None else f"{kind} (alias of {alias})", markup=False)
        return EXIT_OK
    if args.command == "generate":
        return run_generate(args, err)
    if args.command == "check":
        return run_check(args, console)
    if args.command == "consensus":
        return run_consensus(args, err)
    if args.command == "export":
        from .export import run_export

        return run_export(args, console)
    if args.command == "report":
        from .report import run_report

        return run_report(args, console)
    if args.command == "show":
        from .show import run_show

        return run_show(args, console)
    _check_ask(args)
    specs = member_specs(args)
    return _run_async(_run_ask(args, console, specs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["ask", *(argv or [])])
    console = Console()
    err = Console(stderr=True)
    previous: Any = None
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(args, console, err)
    except OutputError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_OUTPUT
    except RecordFileError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return _records_exit(exc)
    except (UsageError, ConfigError, ManifestError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, previous)


def _records_exit(exc: RecordFileError) -> int:
    from .records import CorruptRecordFileError, NotARecordsFileError, RecordFileLockedError

    if isinstance(exc, RecordFileLockedError):
        return EXIT_OUTPUT_LOCKED
    if isinstance(exc, NotARecordsFileError):
        return EXIT_NOT_RECORDS
    if isinstance(exc, CorruptRecordFileError):
        return EXIT_CORRUPT_RECORDS
    return EXIT_OUTPUT


def entry() -> int:
    """The program (``python -m ensemble_async``, the ``ensemble-async`` script): the
    collector tuned for a client once (``runner.tune_gc``), then ``main``."""
    tune_gc()
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
