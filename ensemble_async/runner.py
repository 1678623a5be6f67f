"""How a run's process runs: the event loop (uvloop's when installed) and the garbage
collector's settings, chosen once, here, for every entry point (the CLI, the benchmarks,
a library user who wants them: ``ensemble_async.runner.run(main())``).

* **Event loop.** uvloop is optional (the ``fast`` extra); nothing in ensemble-async
  depends on which loop runs it.  ``ENSEMBLE_ASYNC_LOOP=asyncio`` forces the standard
  loop (to compare, or when a debugger needs it).
* **Garbage collector.** A client that keeps hundreds of requests in flight allocates
  many short-lived objects per request, and CPython's cycle collector, at its default
  thresholds, then spends a large share of the client's CPU re-scanning the same
  long-lived objects (the modules, the session, the run's set-up): measured in
  ``bench/overhead.py``, a third of ``Ensemble.map``'s CPU per request at 20 ms service
  time.  ``run`` therefore freezes what exists when the run starts (``gc.freeze``: the
  set-up is never scanned again) and collects the youngest generation every
  ``GC_THRESHOLD`` allocations instead of 700.  Cycles are still collected, a little
  later.  This is a process-wide setting, so only ``run`` makes it (the library never
  does); ``ENSEMBLE_ASYNC_GC=default`` leaves the collector as it is.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EVENT_LOOP", "GC_THRESHOLD", "LoopName", "loop_factory", "run", "tune_gc"]

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


GC_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation under ``run``."""


def tune_gc() -> bool:
    """Freeze the objects that exist now and raise the youngest generation's threshold to
    ``GC_THRESHOLD`` (unless ``ENSEMBLE_ASYNC_GC=default``); returns whether it did."""
    if os.environ.get("ENSEMBLE_ASYNC_GC", "").strip().lower() == "default":
        return False
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_THRESHOLD:
        gc.set_threshold(GC_THRESHOLD, middle, old)
    return True


def run(coro: Coroutine[Any, Any, _T], *, loop: LoopName = "auto", gc_tuning: bool = True) -> _T:
    """Run ``coro`` to completion on a new event loop (uvloop's when available), with the
    collector tuned for a client (see the module doc; ``gc_tuning=False`` leaves it)."""
    factory = loop_factory(loop)
    if gc_tuning:
        tune_gc()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
