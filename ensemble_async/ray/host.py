"""One backend living inside a Ray actor.

A :class:`BackendHost` builds any registered backend kind from plain options *inside* the
actor process and answers ``generate``/``info``/``health``/``score`` on the actor's event
loop (its methods are coroutines, so Ray runs it as an async actor and many requests
overlap; a local model still micro-batches them in its own worker thread).
``generate_many`` answers a batch of requests sent as one actor call (see
:mod:`ensemble_async.ray.coalesce`): each request runs as its own task, its outcome (the
completions, or the error it raised) comes back in its place, and ``cancel`` stops single
requests of a batch.  It knows nothing of Ray itself: :mod:`ensemble_async.ray.backend`
turns it into actors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..backend import Backend, health_of, info_of
from ..errors import BackendError, ServerError
from ..registry import create_backend
from ..scoring import CompletionScore, Scorer, ScoreRequest, ScoringUnsupportedError
from ..types import BackendInfo, Completion, GenerationRequest, Health

__all__ = ["BackendHost"]


class BackendHost:
    """Hosts one backend of ``kind`` built with ``options`` (see ``create_backend``)."""

    def __init__(self, kind: str, options: Mapping[str, Any]) -> None:
        self._backend: Backend = create_backend(kind, **dict(options))
        self._running: dict[int, asyncio.Task[list[Completion]]] = {}
        self.batches = 0
        self.requests = 0

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        return await self._backend.generate(request)

    async def generate_many(
        self, batch: list[tuple[int, GenerationRequest]]
    ) -> list[list[Completion] | BaseException]:
        """Each ``(key, request)`` generated on its own; outcomes in batch order (the
        completions, or the error it raised)."""
        self.batches += 1
        self.requests += len(batch)
        tasks = [asyncio.create_task(self._backend.generate(request)) for _, request in batch]
        for (key, _), task in zip(batch, tasks, strict=True):
            self._running[key] = task
        try:
            done = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for key, _ in batch:
                self._running.pop(key, None)
        return [self._portable(outcome) for outcome in done]

    def _portable(
        self, outcome: list[Completion] | BaseException
    ) -> list[Completion] | BaseException:
        if isinstance(outcome, BackendError | asyncio.CancelledError) or not isinstance(
            outcome, BaseException
        ):
            return outcome
        return ServerError(
            f"hosted backend {self._backend.name!r} failed: {type(outcome).__name__}",
            backend=self._backend.name,
        )

    def cancel(self, keys: list[int]) -> None:
        """Stop the requests ``keys`` of batches in flight (their callers gave up)."""
        for key in keys:
            task = self._running.get(key)
            if task is not None:
                task.cancel()

    def load(self) -> tuple[int, int]:
        """(batches, requests) answered by ``generate_many`` so far."""
        return self.batches, self.requests

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        backend = self._backend
        if not isinstance(backend, Scorer):
            raise ScoringUnsupportedError(f"hosted backend {backend.name!r} cannot score")
        return await backend.score(request)

    async def check_scoring(self) -> None:
        backend = self._backend
        if not isinstance(backend, Scorer):
            raise ScoringUnsupportedError(f"hosted backend {backend.name!r} cannot score")
        await backend.check_scoring()

    async def info(self) -> BackendInfo:
        return await info_of(self._backend)

    async def health(self) -> Health:
        return await health_of(self._backend)

    def pid(self) -> int:
        """The actor's process id (tests kill it to prove recovery)."""
        return os.getpid()

    async def close(self) -> None:
        await self._backend.aclose()


def renamed(completion: Completion, name: str) -> Completion:
    """``completion`` as answered by ``name`` (the cluster member, not the hosted copy)."""
    return dataclasses.replace(completion, backend=name)
