"""A simulated in-process backend for the scheduler benchmarks (no network)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

from ensemble_async.backend import BaseBackend
from ensemble_async.types import BackendInfo, Completion, GenerationRequest, Health, StreamEvent


class SimBackend(BaseBackend):
    """Answers ``answer(prompt, rng)`` after ``latency(rng)`` seconds (0 = no wait at all).

    ``rng`` is seeded by (seed, prompt), so a member answers an item the same way, after
    the same delay, whatever order the items run in: runs can be compared item by item.
    """

    kind = "sim"

    def __init__(
        self,
        name: str,
        answer: Callable[[str, random.Random], str],
        latency: Callable[[random.Random], float] = lambda _rng: 0.0,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(name=name)
        self._answer = answer
        self._latency = latency
        self._seed = seed

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        prompt = request.prompt or ""
        rng = random.Random(f"{self._seed}:{prompt}")
        delay = self._latency(rng)
        if delay > 0:
            await asyncio.sleep(delay)
        text = self._answer(prompt, rng)
        return [Completion(text=text, finish_reason="stop", backend=self.name, latency_s=delay)]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        for c in await self.generate(request):
            yield c

    async def health(self) -> Health:
        return Health(ok=True, latency_s=0.0)

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, kind=self.kind, max_concurrency=1_000_000)
