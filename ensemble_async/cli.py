"""``python -m ensemble_async``: the command-line runner.

Exit codes: 0 success; 1 unexpected internal error; 2 bad usage or configuration;
3 every backend failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from .backend import Backend
from .ensemble import Ensemble
from .errors import UnknownBackendError
from .member import Member
from .registry import backend_kinds, create_backend
from .retry import RetryPolicy
from .secret import MissingSecretError
from .types import ChatMessage, GenerationRequest

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BACKENDS_FAILED = 3
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble_async",
        description="Drive several LLM servers or local models as one ensemble.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad usage/config, 3 every backend failed, "
        "130 interrupted.",
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
        specs = member_specs(args)
        return asyncio.run(_run_ask(args, console, specs))
    except UsageError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
