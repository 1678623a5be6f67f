"""Requests to one actor issued close together travel as one actor call.

Each call through Ray costs a fixed amount of driver and actor CPU (a task submission,
an object reference to await, a result to fetch), whatever it carries.  A
:class:`Coalescer` sits in front of one actor: callers :meth:`~Coalescer.submit` single
payloads; those submitted in the same event-loop tick (or within ``window_s``), up to
``max_batch``, are sent with one ``send`` and each caller awaits only its own result.

The per-request contract stays whole: ``send`` returns one outcome per payload, a value
or an exception instance, and only that payload's caller sees it (one failed request in a
batch fails only that request; a batch that fails as a whole, e.g. a dead actor, fails
exactly the requests it held).  A caller cancelled before its payload was sent takes it
out of the queue; one cancelled after gets ``cancel([key])`` so the actor can stop that
request alone.  Knows nothing of Ray: :mod:`ensemble_async.ray.backend` supplies ``send``
and ``cancel``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Coalescer", "Outcome", "Send"]

Outcome = Any
"""What ``send`` returns per payload: a value, or an exception instance to raise."""

Send = Callable[[list[tuple[int, Any]]], Awaitable[Sequence[Outcome]]]


@dataclass
class _Waiting:
    key: int
    payload: Any
    future: asyncio.Future[Any]
    sent: bool = field(default=False)


class Coalescer:
    """One actor's request queue (see the module docstring).

    ``send(batch)``: ``batch`` is ``[(key, payload), ...]``; returns one outcome per entry
    in the same order and never raises for one entry's sake (a failure of the whole call
    is returned as a fresh exception per entry).  ``cancel(keys)``: fire-and-forget.
    """

    def __init__(
        self,
        send: Send,
        cancel: Callable[[list[int]], None],
        *,
        window_s: float = 0.0,
        max_batch: int = 64,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._send = send
        self._cancel = cancel
        self.window_s = window_s
        self.max_batch = max_batch
        self._keys = itertools.count()
        self._queue: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._calls: dict[asyncio.Task[None], list[_Waiting]] = {}
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
            self._calls[call] = batch
            call.add_done_callback(self._forget)
            self.batches += 1

    def _forget(self, call: asyncio.Task[None]) -> None:
        self._calls.pop(call, None)

    async def _call(self, batch: list[_Waiting]) -> None:
        try:
            outcomes = await self._send([(w.key, w.payload) for w in batch])
        except Exception as exc:  # a broken send must not leave callers waiting
            outcomes = [exc] * len(batch)
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if waiting.future.done():  # its caller was cancelled
                continue
            if isinstance(outcome, BaseException):
                waiting.future.set_exception(outcome)
            else:
                waiting.future.set_result(outcome)

    async def aclose(self, error: Callable[[], BaseException]) -> None:
        """Fail what is queued with ``error()`` and stop the calls in flight."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queue = self._queue, []
        for waiting in queued:
            if not waiting.future.done():
                waiting.future.set_exception(error())
        calls = dict(self._calls)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for batch in calls.values():
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error())
