"""Run a test double as a stand-alone server, for tests that need one in another process.

    python -m ensemble_async.testing.serve tgi|openai [--ei NAME] [--latency S]

Prints ``URL http://127.0.0.1:PORT`` on stdout (one line, flushed) once it accepts
connections, then serves until SIGTERM or SIGINT.  ``--ei NAME`` answers with
:class:`~ensemble_async.testing.ei_responder.EIResponder` (Ensemble-Instruct-like
completions) under that model name; without it the double's made-up words.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .ei_responder import EIResponder
from .openai_double import OpenAIDouble
from .tgi_double import TGIDouble

__all__ = ["main", "serve"]


async def serve(kind: str, *, ei: str | None = None, latency: float = 0.0) -> None:
    responder = EIResponder(ei) if ei else None
    double: Any
    if kind == "tgi":
        double = TGIDouble(latency=latency, responder=responder)
    elif kind == "openai":
        double = OpenAIDouble(latency=latency, responder=responder)
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
    args = parser.parse_args(argv)
    asyncio.run(serve(args.kind, ei=args.ei, latency=args.latency))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
