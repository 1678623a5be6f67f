"""The one Backend protocol every adapter implements, and a small base class."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

from .types import BackendInfo, Completion, GenerationRequest, Health, StreamEvent

__all__ = ["Backend", "BaseBackend", "gather_n"]


@runtime_checkable
class Backend(Protocol):
    """An async text generator: a remote server or a local model.

    ``generate`` returns ``request.n`` completions.  ``stream`` yields ``TextDelta``
    events and ends with one ``Completion`` (streaming needs ``n == 1``).  Errors are
    ``ensemble_async.errors.BackendError`` subclasses; a backend never retries.
    """

    @property
    def name(self) -> str: ...

    async def generate(self, request: GenerationRequest) -> list[Completion]: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]: ...

    async def health(self) -> Health: ...

    async def info(self) -> BackendInfo: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class BaseBackend:
    """Convenience base: a name and the async context manager around ``aclose``."""

    kind: str = "base"
    requires: ClassVar[tuple[str, ...]] = ()
    """The construction options this kind cannot do without, by name (``("url",)`` for a
    server, ``("model",)`` for a local model).  Config loading and the command line read
    this instead of keeping their own list of built-in kinds."""

    def __init__(self, *, name: str | None = None) -> None:
        self._name = name or self.kind

    @property
    def name(self) -> str:
        return self._name

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self._name!r}>"


async def gather_n(
    n: int,
    have: list[Completion],
    one_more: Callable[[int], Coroutine[Any, Any, list[Completion]]],
) -> list[Completion]:
    """Top ``have`` up to ``n`` completions with extra calls, run concurrently.

    ``one_more(k)`` makes the k-th extra call (k counts from 0); it is used by servers
    that ignore ``n`` (TGI, llama.cpp).  If any extra call fails, the others are
    cancelled and the first error propagates as itself.  Completions are re-indexed 0..n-1.
    """
    missing = n - len(have)
    out = list(have[:n])
    if missing > 0:
        try:
            async with asyncio.TaskGroup() as tg:
                tasks: list[asyncio.Task[list[Completion]]] = [
                    tg.create_task(one_more(k)) for k in range(missing)
                ]
        except ExceptionGroup as group:
            # The first failure is the one callers classify (retryable or not).
            raise group.exceptions[0] from None
        for task in tasks:
            out.extend(task.result())
        out = out[:n]
    return [_reindex(c, i) for i, c in enumerate(out)]


def _reindex(c: Completion, index: int) -> Completion:
    if c.index == index:
        return c
    return Completion(
        text=c.text,
        finish_reason=c.finish_reason,
        backend=c.backend,
        latency_s=c.latency_s,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        model=c.model,
        index=index,
    )
