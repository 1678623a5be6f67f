"""One backend living inside a Ray actor.

A :class:`BackendHost` builds any registered backend kind from plain options *inside* the
actor process and answers ``generate``/``info``/``health``/``score`` on the actor's event
loop (its methods are coroutines, so Ray runs it as an async actor and many requests
overlap; a local model still micro-batches them in its own worker thread).  It knows
nothing of Ray itself: :mod:`ensemble_async.ray.backend` turns it into actors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..backend import Backend
from ..registry import create_backend
from ..scoring import CompletionScore, Scorer, ScoreRequest, ScoringUnsupportedError
from ..types import BackendInfo, Completion, GenerationRequest, Health

__all__ = ["BackendHost"]


class BackendHost:
    """Hosts one backend of ``kind`` built with ``options`` (see ``create_backend``)."""

    def __init__(self, kind: str, options: Mapping[str, Any]) -> None:
        self._backend: Backend = create_backend(kind, **dict(options))

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        return await self._backend.generate(request)

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
        return await self._backend.info()

    async def health(self) -> Health:
        return await self._backend.health()

    def pid(self) -> int:
        """The actor's process id (tests kill it to prove recovery)."""
        return os.getpid()

    async def close(self) -> None:
        await self._backend.aclose()


def renamed(completion: Completion, name: str) -> Completion:
    """``completion`` as answered by ``name`` (the cluster member, not the hosted copy)."""
    return dataclasses.replace(completion, backend=name)
