"""Consensus decisions computed on a Ray cluster.

:class:`RayConsensus` is an ``Ensemble(decide=...)`` hook: once an item's candidates are
in, the ensemble hands over its :class:`~ensemble_async.consensus.IncrementalSelector`
(which pickles with its state) and gets back the decision that ``finalize()`` makes,
computed by a pool of :class:`ConsensusHost` actors spread over the nodes.  The same code
decides on the same state, so the decision is the one the driver would have made.

Decisions bound for one actor in the same event-loop tick travel as one actor call
(:class:`~ensemble_async.ray.coalesce.Coalescer`), each goes to the actor with the fewest
undecided items, and at most ``max_in_flight`` items are out at once (more callers wait:
backpressure).  A decision is pure, so an actor that dies costs nothing: the items it
held are decided in the driver instead, with the same result.

What stays in the driver: step 1 and the novelty pool (one ordered decision), the
members' admission, retries and cache, the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from ..consensus import Decision, IncrementalSelector
from ..errors import ConnectError
from .backend import ensure_ray
from .coalesce import Coalescer, Send

__all__ = ["ConsensusHost", "RayConsensus"]


class ConsensusHost:
    """Decides items inside an actor; counts what it decided (for tests and stats)."""

    def __init__(self) -> None:
        self.decided = 0

    def decide_many(
        self, batch: list[tuple[int, IncrementalSelector]]
    ) -> list[Decision | BaseException]:
        out: list[Decision | BaseException] = []
        for _, selector in batch:
            try:
                out.append(selector.finalize())
            except Exception as exc:  # returned to that item's caller only
                out.append(exc)
        self.decided += len(batch)
        return out

    def cancel(self, keys: list[int]) -> None:
        """Nothing to stop: a decision takes a moment and cannot be interrupted."""

    def stats(self) -> tuple[int, int]:
        """(process id, items decided)."""
        return os.getpid(), self.decided


@dataclass
class _Decider:
    actor: Any
    queue: Coalescer
    outstanding: int = 0


class RayConsensus:
    """A pool of ``actors`` :class:`ConsensusHost` actors (see the module docstring).

    Call it with a selector to get its decision.  ``address``: as for ``ray.init``
    (``None``: the running Ray, else a new local one).  ``num_cpus``: what each actor
    reserves; none by default, as a decision takes milliseconds and reserving a core
    could leave a small cluster without room for the members' actors.  Close with
    :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        actors: int = 2,
        num_cpus: float = 0.0,
        max_in_flight: int = 256,
        max_batch: int = 64,
        address: str | None = None,
        spread: bool = True,
    ) -> None:
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.actors = actors
        self.num_cpus = num_cpus
        self.max_batch = max_batch
        self.address = address
        self.spread = spread
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pool: list[_Decider] = []
        self._lock = asyncio.Lock()
        self._closed = False
        self.in_driver = 0
        """Items decided in the driver because their actor failed."""

    def _spawn(self) -> list[_Decider]:
        ensure_ray(self.address)
        actor_class = ray.remote(ConsensusHost).options(
            num_cpus=self.num_cpus,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy="SPREAD" if self.spread else "DEFAULT",
        )
        pool = []
        for _ in range(self.actors):
            actor: Any = actor_class.remote()
            pool.append(
                _Decider(
                    actor,
                    Coalescer(
                        _sender(actor),
                        actor.cancel.remote,
                        lost=lambda: ConnectError("consensus actor unavailable"),
                        max_batch=self.max_batch,
                    ),
                )
            )
        return pool

    async def _deciders(self) -> list[_Decider]:
        if self._closed:
            raise ConnectError("ray consensus is closed")
        if not self._pool:
            async with self._lock:
                if not self._pool:
                    self._pool = await asyncio.to_thread(self._spawn)
        return self._pool

    async def start(self) -> None:
        """Start the actors now (otherwise on the first decision)."""
        await self._deciders()

    async def __call__(self, selector: IncrementalSelector) -> Decision:
        """``selector.finalize()``, computed by an actor."""
        async with self._slots:
            pool = await self._deciders()
            decider = min(pool, key=lambda d: d.outstanding)
            decider.outstanding += 1
            try:
                decision: Decision = await decider.queue.submit(selector)
            except ConnectError:  # the actor died: decide here, the same way
                self.in_driver += 1
                return selector.finalize()
            finally:
                decider.outstanding -= 1
            return decision

    async def stats(self) -> list[tuple[int, int]]:
        """(process id, items decided) per actor."""
        pool = await self._deciders()
        refs = [d.actor.stats.remote() for d in pool]
        return [tuple(await ref) for ref in refs]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, []
        for decider in pool:
            await decider.queue.aclose()
        await asyncio.to_thread(_kill_all, [d.actor for d in pool])


def _sender(actor: Any) -> Send:
    async def send(
        batch: list[tuple[int, IncrementalSelector]],
    ) -> AsyncIterator[tuple[int, Any]]:
        try:
            got: list[Any] = await actor.decide_many.remote(batch)
        except ray.exceptions.RayError:
            return  # all lost: decided in the driver instead
        for (key, _), outcome in zip(batch, got, strict=True):
            yield key, outcome

    return send


def _kill_all(actors: list[Any]) -> None:
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
