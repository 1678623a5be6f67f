"""``python -m ensemble_async``: the command-line runner.

Subcommands:

* ``ask [PROMPT] [--member KIND=URL_OR_MODEL,...]``: one prompt through the ensemble
  (the default command);
* ``generate [--config X.toml] [--quiet | --log-jsonl PATH] [--output PATH]``: the
  Ensemble-Instruct pipeline (without ``--config``: the embedded default, two local
  models); resumable: rerun the same command after a crash and it continues;
* ``check --config X.toml``: reach every configured backend (health, model, latency of
  a 1-token request);
* ``consensus IN.jsonl [--out OUT.jsonl] [--threshold T]``: re-run step 5 on lines
  that carry ``candidates``;
* ``export --format alpaca|chat|messages|prompt-completion|parquet|hf IN OUT``: records
  to training formats or a Hub-ready dataset (``ensemble_async.export``);
* ``report OUTPUT``: report.html and report.json about a run (``ensemble_async.report``);
* ``show RECORDS [-n N] [--rejects] [--seed S]``: records with their candidates and
  decision (``ensemble_async.show``);
* ``backends``: the registered backend kinds.

Exit codes: 0 success; 1 unexpected internal error; 2 bad usage, configuration or input
(the message names the file, key or line); 3 backends unreachable (``check``) or every
backend failed; 4 the output cannot be written (full disk, read-only, not creatable);
5 items deferred (a member was unavailable: rerun the same command when it is back);
6 the output is locked by another run; 7 the output is not a records file (or not a
regular file); 8 the records file is corrupt (a bad line before its last); 130 interrupted (Ctrl-C or SIGTERM: the
run is cancelled, finished records are on disk, sessions are closed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from .backend import Backend, health_of, info_of
from .config import (
    Config,
    ConfigError,
    OutputError,
    build_members,
    check_environment,
    check_output_writable,
    create_backends,
    default_config,
    load_config,
)
from .consensus import select
from .ensemble import Ensemble
from .errors import BackendError, UnknownBackendError
from .member import Member
from .progress import Mode, Progress
from .records import RecordFileError
from .registry import backend_kinds, create_backend
from .retry import RetryPolicy
from .secret import MissingSecretError
from .seedtasks import SeedFormatError, load_seed_tasks
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


class UsageError(Exception):
    """Bad command-line input; the message names what is wrong."""


@dataclass(frozen=True)
class MemberSpec:
    kind: str
    options: dict[str, Any]


def parse_member(text: str) -> MemberSpec:
    """``KIND=URL_OR_MODEL[,key=value...]``, e.g. ``tgi=http://gpu1:8080`` or
    ``openai=http://gpu2:8000,model=meta-llama/Llama-3.1-8B,api_key_env=VLLM_KEY``."""
    kind, sep, rest = text.partition("=")
    if not sep or not kind or not rest:
        raise UsageError(f"--member {text!r}: expected KIND=URL_OR_MODEL[,key=value...]")
    target, *pairs = rest.split(",")
    options: dict[str, Any] = {"model" if kind == "transformers" else "url": target}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--member {text!r}: option {pair!r} is not key=value")
        options[key] = _coerce(value)
    return MemberSpec(kind, options)


def _coerce(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def default_members() -> list[MemberSpec]:
    """The embedded default ensemble: the two small local models from PyPI."""
    from .models import embedded_backend_options, embedded_models

    return [MemberSpec("transformers", embedded_backend_options(m.key)) for m in embedded_models()]


def _build(specs: Sequence[MemberSpec]) -> list[Backend]:
    backends: list[Backend] = []
    names: set[str] = set()
    for i, spec in enumerate(specs):
        options = dict(spec.options)
        name = str(options.get("name") or f"{spec.kind}-{i}")
        if name in names:
            name = f"{name}-{i}"
        names.add(name)
        options["name"] = name
        try:
            backends.append(create_backend(spec.kind, **options))
        except UnknownBackendError as exc:
            raise UsageError(str(exc)) from None
        except MissingSecretError as exc:
            raise UsageError(f"member {name}: {exc}") from None
        except TypeError as exc:
            raise UsageError(f"member {name} ({spec.kind}): bad option: {exc}") from None
    return backends


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


def member_specs(args: argparse.Namespace) -> list[MemberSpec]:
    """The ``--member`` options, or the embedded default (this may assemble a model file:
    call it before the event loop starts)."""
    if args.member:
        return [parse_member(m) for m in args.member]
    try:
        return default_members()
    except FileNotFoundError as exc:  # MissingModelError says which package to install
        raise UsageError(str(exc)) from None


async def _run_ask(
    args: argparse.Namespace, console: Console, specs: Sequence[MemberSpec] | None = None
) -> int:
    specs = member_specs(args) if specs is None else specs
    request = _request(args)
    backends = _build(specs)
    # Every candidate is shown, so wait for all of them (up to the timeout).
    ensemble = Ensemble(
        [Member(b, retry=RetryPolicy(max_attempts=args.attempts)) for b in backends],
        policy="deadline",
        deadline_s=args.timeout,
    )
    async with ensemble:
        result = await ensemble.run(request)

    table = Table(title=f"{len(backends)} members, {result.wall_s:.2f} s", show_lines=True)
    for column in ("#", "member", "candidate", "finish", "tokens", "latency"):
        table.add_column(column)
    for c in result.candidates:
        if c.completion is None:
            table.add_row(
                str(c.index), c.source, f"[red]{c.status}: {c.error or ''}[/red]", "-", "-", "-"
            )
            continue
        done = c.completion
        mark = " [green](kept)[/green]" if result.decision.index == c.index else ""
        table.add_row(
            str(c.index),
            c.source + mark,
            done.text.strip(),
            done.finish_reason,
            f"{done.prompt_tokens}+{done.completion_tokens}",
            f"{done.latency_s:.2f}s",
        )
    console.print(f"[bold]prompt:[/bold] {args.prompt}")
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


def _load(args: argparse.Namespace) -> Config:
    """The config named by ``--config``, else the embedded default.  The default resolves
    (and may assemble) the model files: this runs before the event loop starts."""
    if args.config is not None:
        return load_config(args.config)
    try:
        return default_config()
    except FileNotFoundError as exc:  # MissingModelError says which package to install
        raise UsageError(str(exc)) from None


def _progress_mode(args: argparse.Namespace, err: Console) -> tuple[Mode, TextIO | None]:
    if args.log_jsonl is not None:
        if args.log_jsonl == "-":
            return "jsonl", None
        path = Path(args.log_jsonl)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return "jsonl", path.open("a", encoding="utf-8")
        except OSError as exc:
            raise OutputError("--log-jsonl", None, f"{path}: {exc.strerror or exc}") from None
    if args.quiet or not err.is_terminal:
        return "quiet", None
    return "rich", None


def run_generate(args: argparse.Namespace, err: Console) -> int:
    config = _load(args)
    if args.output is not None:
        config = config.with_output(args.output)
    check_environment(config)  # before anything is created on disk
    check_output_writable(config)
    settings = config.settings()
    try:
        seeds = load_seed_tasks(config.run.seeds)
    except SeedFormatError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(config.source, "run.seeds", f"{exc.strerror or exc}") from None
    mode, log_file = _progress_mode(args, err)
    try:
        try:
            return asyncio.run(
                generate(config, settings, seeds, mode=mode, console=err, log=log_file)
            )
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
    finally:
        if log_file is not None:
            log_file.close()


async def generate(
    config: Config,
    settings: Any,
    seeds: Sequence[Any],
    *,
    mode: Mode = "quiet",
    console: Console | None = None,
    log: TextIO | None = None,
) -> int:
    """Run the pipeline for ``config``: members, cache and record files opened and
    closed here.  SIGTERM cancels the run like Ctrl-C (records written so far stay)."""
    from .pipeline import Pipeline

    console = console or Console(stderr=True)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with contextlib.AsyncExitStack() as stack:
            cache = None
            if config.run.cache:
                cache = await stack.enter_async_context(_open_cache(config))
            writer, answerers = build_members(config, cache=cache)
            members = list(dict.fromkeys([writer, *answerers]))
            for member in members:
                stack.push_async_callback(member.aclose)
            sink = await stack.enter_async_context(_open_records(config))
            progress = Progress(
                mode,
                members=members,
                targets={"instructions": sum(config.run.targets.to_dict().values())},
                console=console,
                log=log,
            )
            if mode == "jsonl":
                progress.log_start(
                    config=config.source,
                    output=str(config.run.output),
                    existing_records=sink.count,
                    backends=[config.backends[m.name].describe() for m in members],
                )
            try:
                async with progress:
                    for member in members:
                        await member.start()
                    fingerprint = await _check_manifest(config, settings, seeds, members)
                    pipeline = Pipeline(
                        writer=writer,
                        answerers=answerers,
                        seeds=seeds,
                        settings=settings,
                        sink=sink,
                        events=progress,
                        writer_answers=_writer_answers(config),
                        served_by=_served_by(config),
                        fingerprint=fingerprint,
                    )
                    summary = await pipeline.run()
            except asyncio.CancelledError:
                progress.summary(status="interrupted")
                raise
            progress.summary(summary)
            if _all_failed(members):
                console.print("[red]every backend failed[/red]")
                return EXIT_BACKENDS_FAILED
            if summary.deferred:
                reasons = ", ".join(f"{r} x{n}" for r, n in summary.deferred_reasons.items())
                console.print(
                    f"[yellow]{summary.deferred} item(s) deferred[/yellow] ({reasons}): "
                    "rerun the same command once every backend is back"
                )
                return EXIT_DEFERRED
            return EXIT_OK
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


async def _check_manifest(
    config: Config, settings: Any, seeds: Sequence[Any], members: Sequence[Member]
) -> str:
    """Build the run manifest, compare it with the one beside the records (write it when
    there is none); a different definition is a usage error naming each changed field."""
    from . import __version__
    from .manifest import (
        ManifestError,
        check_manifest,
        manifest_path,
        run_manifest,
        seed_tasks_digest,
        templates_digest,
    )

    async def served_model(member: Member) -> str | None:
        try:
            async with asyncio.timeout(member.timeout_s):
                return (await info_of(member.backend)).model
        except (BackendError, TimeoutError):
            return None

    models = await asyncio.gather(*(served_model(m) for m in members))
    manifest = run_manifest(
        preset=settings.name,
        seed=settings.seed,
        settings=settings.identity(),
        seed_tasks_sha256=seed_tasks_digest(seeds),
        templates_sha256=templates_digest(),
        members={
            m.name: {"kind": config.backends[m.name].kind, "model": model}
            for m, model in zip(members, models, strict=True)
        },
        roles={"writer": config.roles.writer, "answerers": list(config.roles.answerers)},
        selection={
            "consensus_complete": settings.consensus_complete,
            "writer_answers": _writer_answers(config),
        },
        library_version=__version__,
    )
    path = manifest_path(config.run.output)
    try:
        await asyncio.to_thread(check_manifest, path, manifest)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    return str(manifest["fingerprint"])


def _writer_answers(config: Config) -> Any:
    """``roles.writer_answers`` when the config has it: "provenance" keeps the writer's
    answer out of the vote; anything else lets it vote."""
    value = getattr(config.roles, "writer_answers", None)
    return "provenance" if value == "provenance" else "vote"


def _served_by(config: Config) -> dict[str, Any]:
    from .pipeline import ServedBy, host_of

    return {
        name: ServedBy(backend=b.kind, host=host_of(b.url)) for name, b in config.backends.items()
    }


@contextlib.asynccontextmanager
async def _open_cache(config: Config) -> AsyncIterator[Any]:
    from .cache import CacheError, ResponseCache

    try:
        cache = await ResponseCache.open(config.run.cache_file)
    except CacheError as exc:
        raise OutputError(config.source, "run.cache_path", str(exc)) from None
    try:
        yield cache
    finally:
        await cache.aclose()


@contextlib.asynccontextmanager
async def _open_records(config: Config) -> AsyncIterator[Any]:
    from .records import RecordStorageError
    from .sink import AsyncRecordWriter

    try:
        writer = await AsyncRecordWriter.open(
            config.run.output, rejects_path=config.run.rejects_path
        )
    except RecordStorageError as exc:
        raise OutputError(config.source, "run.output", str(exc)) from None
    async with writer:
        yield writer


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


@dataclass
class Probe:
    name: str
    kind: str
    target: str
    healthy: bool = False
    health_detail: str = ""
    model: str | None = None
    latency_s: float | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.healthy and self.error is None


async def probe_backend(
    name: str, backend: Backend, target: str, kind: str, timeout: float
) -> Probe:
    """Health, model and the latency of a 1-token greedy request for one backend."""
    probe = Probe(name, kind, target)
    try:
        async with asyncio.timeout(timeout):
            health = await health_of(backend)
        probe.healthy = health.ok
        probe.health_detail = health.detail
        if not health.ok:
            return probe
        async with asyncio.timeout(timeout):
            info = await info_of(backend)
        probe.model = info.model
        request = GenerationRequest(prompt="Hello", max_new_tokens=1, temperature=0.0)
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await backend.generate(request)
        probe.latency_s = time.perf_counter() - started
    except TimeoutError:
        probe.error = f"no answer within {timeout:g}s"
    except BackendError as exc:
        probe.error = f"{type(exc).__name__}: {exc}"
    return probe


async def check(config: Config, *, timeout: float = 30.0) -> list[Probe]:
    names = list(config.backends)
    backends = create_backends(config, names)
    try:
        return list(
            await asyncio.gather(
                *(
                    probe_backend(
                        name,
                        backends[name],
                        config.backends[name].url or config.backends[name].model or "",
                        config.backends[name].kind,
                        timeout,
                    )
                    for name in names
                )
            )
        )
    finally:
        for backend in backends.values():
            await backend.aclose()


def run_check(args: argparse.Namespace, console: Console) -> int:
    config = _load(args)
    probes = asyncio.run(check(config, timeout=args.timeout))
    table = Table(title=f"{config.source}: {len(probes)} backends")
    for column in ("backend", "kind", "target", "health", "model", "1-token latency", "error"):
        table.add_column(column)
    for p in probes:
        health = "[green]ok[/green]" if p.healthy else f"[red]down[/red] {p.health_detail}"
        table.add_row(
            p.name,
            p.kind,
            p.target,
            health,
            p.model or "-",
            "-" if p.latency_s is None else f"{p.latency_s:.3f}s",
            p.error or "",
        )
    console.print(table)
    unreachable = [p.name for p in probes if not p.reachable]
    if unreachable:
        console.print(f"[red]unreachable:[/red] {', '.join(unreachable)}")
        return EXIT_BACKENDS_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------ consensus


def consensus_lines(path: Path, *, threshold: float) -> list[dict[str, Any]]:
    """Every line of ``path`` with its ``selection`` added; UsageError names file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    out: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object")
        candidates = obj.get("candidates")
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise UsageError(f"{where}: 'candidates' must be a list of strings")
        selection = select(candidates, threshold=threshold)
        out.append({**obj, "selection": {**selection.to_dict(), "text": selection.text}})
    return out


def run_consensus(args: argparse.Namespace, err: Console) -> int:
    if not args.threshold >= 0:
        raise UsageError(f"--threshold must be >= 0, got {args.threshold}")
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputError(str(path), None, f"cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble_async",
        description="Drive several LLM servers or local models as one ensemble.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad usage/config/input, 3 backends "
        "unreachable or every backend failed, 4 output not writable, 130 interrupted.",
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
        metavar="KIND=URL_OR_MODEL[,k=v...]",
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
    p_gen.add_argument("--output", type=Path, help="records file (overrides run.output)")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["ask", *(argv or [])])
    console = Console()
    err = Console(stderr=True)
    try:
        if args.command == "backends":
            for kind in backend_kinds():
                console.print(kind)
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
        specs = member_specs(args)
        return asyncio.run(_run_ask(args, console, specs))
    except OutputError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_OUTPUT
    except RecordFileError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return _records_exit(exc)
    except (UsageError, ConfigError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted")
        return EXIT_INTERRUPTED


def _records_exit(exc: RecordFileError) -> int:
    from .records import CorruptRecordFileError, NotARecordsFileError, RecordFileLockedError

    if isinstance(exc, RecordFileLockedError):
        return EXIT_OUTPUT_LOCKED
    if isinstance(exc, NotARecordsFileError):
        return EXIT_NOT_RECORDS
    if isinstance(exc, CorruptRecordFileError):
        return EXIT_CORRUPT_RECORDS
    return EXIT_OUTPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
