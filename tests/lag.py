"""How late the event loop runs: the probe the 'never block the loop' tests share."""

from __future__ import annotations

import asyncio
import gc

MAX_LAG_S = 0.25
"""The stall bound every such test holds the code to (the local-model adapter's first)."""


class LagProbe:
    """Measures how late the event loop wakes a 10 ms sleeper, at worst (``max_lag``),
    while it is entered; ``ticks`` says how often it woke.

    On entry the objects alive so far are frozen out of the garbage collector (and
    unfrozen on exit): in a long test session the heap earlier tests left (torch,
    transformers, Ray...) makes one full collection take a few hundred milliseconds,
    which would be counted against the code under test."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.ticks = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            started = loop.time()
            await asyncio.sleep(0.01)
            self.max_lag = max(self.max_lag, loop.time() - started - 0.01)
            self.ticks += 1

    async def __aenter__(self) -> LagProbe:
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        try:
            await self._task
        finally:
            gc.unfreeze()
