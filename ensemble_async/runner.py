"""The event loop a run uses: uvloop's when it is installed, else asyncio's own.

``run(coro)`` is ``asyncio.run`` with that choice made once, here, for every entry point
(the CLI, the benchmarks, a library user who wants it).  uvloop is optional (the
``fast`` extra): it cuts the loop's own share of each request (callbacks, socket reads,
timers) by roughly a third; nothing in ensemble-async depends on which loop runs it.
``ENSEMBLE_ASYNC_LOOP=asyncio`` forces the standard loop (e.g. to compare, or when a
debugger needs it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EVENT_LOOP", "LoopName", "loop_factory", "run"]

_T = TypeVar("_T")

LoopName = Literal["auto", "asyncio", "uvloop"]


def _default() -> str:
    wanted = os.environ.get("ENSEMBLE_ASYNC_LOOP", "auto").strip().lower() or "auto"
    if wanted == "asyncio":
        return "asyncio"
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


EVENT_LOOP: str = _default()
"""``"uvloop"`` or ``"asyncio"``: what ``run`` uses by default in this process."""


def loop_factory(loop: LoopName = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory ``asyncio.Runner`` takes for ``loop`` (None: asyncio's default).
    ``"uvloop"`` without uvloop installed is an ``ImportError`` naming the extra."""
    name = EVENT_LOOP if loop == "auto" else loop
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise ValueError(f"event loop must be auto, asyncio or uvloop, got {loop!r}")
    try:
        import uvloop
    except ImportError as exc:
        raise ImportError(
            "the uvloop event loop needs: pip install 'ensemble-async[fast]'"
        ) from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, _T], *, loop: LoopName = "auto") -> _T:
    """Run ``coro`` to completion on a new event loop (uvloop's when available)."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(coro)
