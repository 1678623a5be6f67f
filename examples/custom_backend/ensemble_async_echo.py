"""A third-party backend: answers with the prompt, reversed word by word.

Install this folder (``pip install ./examples/custom_backend``) and the kind ``echo`` is
available everywhere a kind name is accepted::

    python -m ensemble_async ask "one two three" --no-chat --member echo

It needs no URL and no model, so it declares nothing in ``requires`` (a server kind
declares ``requires = ("url",)``, a local one ``("model",)``; config loading and
``--member`` read it to know what to ask for).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ensemble_async import (
    BackendInfo,
    BaseBackend,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)


class EchoBackend(BaseBackend):
    kind = "echo"
    requires = ()

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def _answer(self, request: GenerationRequest) -> str:
        text = request.prompt
        if text is None and request.messages:
            text = request.messages[-1].content
        words = (text or "").split()[::-1]
        return " ".join(words[: request.max_new_tokens])

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        started = time.perf_counter()
        text = self._answer(request)
        return [
            Completion(
                text=text,
                finish_reason="stop",
                backend=self.name,
                latency_s=time.perf_counter() - started,
                completion_tokens=len(text.split()),
                index=i,
            )
            for i in range(request.n)
        ]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        (done,) = await self.generate(request.replace(n=1))
        for word in done.text.split(" "):
            yield TextDelta(word)
        yield done

    async def health(self) -> Health:
        return Health(ok=True, latency_s=0.0)

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, kind=self.kind, model="echo")
