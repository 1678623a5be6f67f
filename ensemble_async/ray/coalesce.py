"""Requests to one actor issued close together travel as one actor call.

Each call through Ray costs a fixed amount of driver and actor CPU (a task submission,
an object reference to await, a result to fetch), whatever it carries.  A
:class:`Coalescer` sits in front of one actor: callers :meth:`~Coalescer.submit` single
payloads; those submitted in the same event-loop tick (or within ``window_s``), up to
``max_batch``, are sent with one ``send`` and each caller awaits only its own result.

The per-request contract stays whole: ``send`` yields ``(key, outcome)`` for each payload
(in any order), the outcome a value or an exception instance, and only that payload's
caller sees it, as soon as ``send`` yields it: one failed request in a batch fails only
that request.  The payloads a call never answered (it failed as a whole, e.g. a dead
actor) get ``lost()``: exactly the requests it held.  A caller cancelled before its
payload was sent takes it out of the queue; one cancelled after gets ``cancel([key])``
so the actor can stop that request alone.  Knows nothing of Ray:
:mod:`ensemble_async.ray.backend` and :mod:`ensemble_async.ray.consensus` supply ``send``,
``cancel`` and ``lost``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Coalescer", "Outcome", "Send"]

Outcome = Any
"""What ``send`` returns per payload: a value, or an exception instance to raise."""

Send = Callable[[list[tuple[int, Any]]], AsyncIterator[tuple[int, Outcome]]]


@dataclass
class _Waiting:
    key: int
    payload: Any
    future: asyncio.Future[Any]
    sent: bool = field(default=False)


class Coalescer:
    """One actor's request queue (see the module docstring).

    ``send(batch)``: ``batch`` is ``[(key, payload), ...]``; yields ``(key, outcome)``
    pairs and never raises for one entry's sake.  ``cancel(keys)``: fire-and-forget.
    ``lost()``: a fresh error for each payload a call ended without answering.
    """

    def __init__(
        self,
        send: Send,
        cancel: Callable[[list[int]], None],
        *,
        lost: Callable[[], BaseException],
        window_s: float = 0.0,
        max_batch: int = 64,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._send = send
        self._cancel = cancel
        self._lost = lost
        self.window_s = window_s
        self.max_batch = max_batch
        self._keys = itertools.count()
        self._queue: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Calls sent so far (for tests and the bench)."""

    async def submit(self, payload: Any) -> Any:
        """Send ``payload`` with whatever else is queued; its own outcome, or raise it."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(next(self._keys), payload, loop.create_future())
        self._queue.append(waiting)
        if len(self._queue) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = (
                loop.call_later(self.window_s, self._flush)
                if self.window_s
                else loop.call_soon(self._flush)
            )
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if not waiting.sent:
                self._queue.remove(waiting)
            elif waiting.future.cancelled():  # sent and not answered: stop it there
                self._cancel([waiting.key])
            raise

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            for waiting in batch:
                waiting.sent = True
            call = asyncio.get_running_loop().create_task(self._call(batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            self.batches += 1

    async def _call(self, batch: list[_Waiting]) -> None:
        open_ = {w.key: w for w in batch}
        try:
            async for key, outcome in self._send([(w.key, w.payload) for w in batch]):
                waiting = open_.pop(key, None)
                if waiting is None or waiting.future.done():  # its caller was cancelled
                    continue
                if isinstance(outcome, BaseException):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(outcome)
        finally:  # whatever the call did not answer is lost, never left waiting
            for waiting in open_.values():
                if not waiting.future.done():
                    waiting.future.set_exception(self._lost())

    async def aclose(self) -> None:
        """Fail what is queued or in flight with ``lost()`` and stop the calls."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queue = self._queue, []
        for waiting in queued:
            if not waiting.future.done():
                waiting.future.set_exception(self._lost())
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
