"""Run a test double as a stand-alone server, for tests that need one in another process.

    python -m ensemble_async.testing.serve tgi|openai [--ei NAME] [--latency S]
        [--api-key-env NAME [--echo-rejected-key]] [--fault-rate R [--fault-after N]] [--no-logprobs]

Prints ``URL http://127.0.0.1:PORT`` on stdout (one line, flushed) once it accepts
connections, then serves until SIGTERM or SIGINT.  ``--ei NAME`` answers with
:class:`~ensemble_async.testing.ei_responder.EIResponder` (Ensemble-Instruct-like
completions) under that model name; without it the double's made-up words.

``--api-key-env NAME`` (openai only) demands the bearer token held by environment
variable ``NAME``; with ``--echo-rejected-key`` a wrong token is answered with a 401 that
quotes it back, as some servers do (to test that clients keep it out of their output).
``--fault-rate R`` fails that share of generation requests with a 503 or a dropped
connection (seeded, so reproducible); ``--fault-after N`` answers the first N normally
(e.g. a client's start-up probe) before faults begin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from .ei_responder import EIResponder
from .faults import Fault, FaultPlan
from .openai_double import OpenAIDouble
from .tgi_double import TGIDouble

__all__ = ["echo_rejected_key", "main", "serve"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def echo_rejected_key(api_key: str) -> Any:
    """aiohttp middleware: ``/v1/*`` requests without ``Bearer api_key`` get a 401 whose
    message quotes the token they sent (a careless server's habit)."""

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        sent = request.headers.get("Authorization", "")
        if request.path.startswith("/v1/") and sent != f"Bearer {api_key}":
            token = sent.removeprefix("Bearer ")
            error = {"message": f"Incorrect API key provided: {token}", "code": 401}
            return web.json_response({"error": error}, status=401)
        return await handler(request)

    return middleware


class _EchoingOpenAIDouble(OpenAIDouble):
    def __init__(self, *, api_key: str, **options: Any) -> None:
        super().__init__(api_key=api_key, **options)
        self._echo = echo_rejected_key(api_key)

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._echo)
        super().routes(app)


async def serve(
    kind: str,
    *,
    ei: str | None = None,
    latency: float = 0.0,
    api_key: str | None = None,
    echo_rejected: bool = False,
    fault_rate: float = 0.0,
    fault_after: int = 0,
    logprobs: bool = True,
) -> None:
    responder = EIResponder(ei) if ei else None
    faults = FaultPlan(fault_rate, [Fault.status(503), Fault.reset()], seed=1, grace=fault_after)
    double: Any
    if kind == "tgi":
        if api_key is not None:
            raise ValueError("--api-key-env is for the openai double")
        double = TGIDouble(
            latency=latency, responder=responder, faults=faults, prefill_logprobs=logprobs
        )
    elif kind == "openai":
        if echo_rejected and api_key is not None:
            double = _EchoingOpenAIDouble(
                api_key=api_key, latency=latency, responder=responder, faults=faults
            )
        else:
            double = OpenAIDouble(
                latency=latency,
                responder=responder,
                api_key=api_key,
                faults=faults,
                logprobs=logprobs,
            )
    else:
        raise ValueError(f"unknown double {kind!r} (tgi or openai)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with double:
        sys.stdout.write(f"URL {double.url}\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble_async.testing.serve")
    parser.add_argument("kind", choices=("tgi", "openai"))
    parser.add_argument("--ei", metavar="NAME", help="answer like an Ensemble-Instruct LM")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument(
        "--api-key-env", metavar="NAME", help="demand the bearer token in $NAME (openai)"
    )
    parser.add_argument(
        "--echo-rejected-key",
        action="store_true",
        help="answer a wrong token with a 401 that quotes it (needs --api-key-env)",
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of requests failed (503 or reset)"
    )
    parser.add_argument(
        "--fault-after",
        type=int,
        default=0,
        metavar="N",
        help="answer the first N generation requests normally, then start failing",
    )
    parser.add_argument(
        "--no-logprobs",
        action="store_true",
        help="answer without log-probabilities (a server that cannot score)",
    )
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    if args.echo_rejected_key and api_key is None:
        parser.error("--echo-rejected-key needs --api-key-env")
    asyncio.run(
        serve(
            args.kind,
            ei=args.ei,
            latency=args.latency,
            api_key=api_key,
            echo_rejected=args.echo_rejected_key,
            fault_rate=args.fault_rate,
            fault_after=args.fault_after,
            logprobs=not args.no_logprobs,
        )
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
