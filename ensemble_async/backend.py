"""The one Backend protocol every adapter implements, and a small base class.

The protocol is small: ``name``, ``generate``, ``aclose`` and the async context manager.
``stream``, ``health`` and ``info`` are optional: ``BaseBackend`` gives them defaults
(built on ``generate``, or saying nothing is known), and ``stream_of``, ``health_of`` and
``info_of`` call a backend's own method when it has one and the default otherwise, so
callers never need to know which kind they hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, cast, runtime_checkable

from .types import BackendInfo, Completion, GenerationRequest, Health, StreamEvent

__all__ = ["Backend", "BaseBackend", "gather_n", "health_of", "info_of", "kind_of", "stream_of"]


@runtime_checkable
class Backend(Protocol):
    """An async text generator: a remote server or a local model.

    ``generate`` returns ``request.n`` completions.  Errors are
    ``ensemble_async.errors.BackendError`` subclasses; a backend never retries and
    never times a whole request (the member's attempt does).

    Optional methods (defaults in ``BaseBackend``; call them through ``stream_of``,
    ``health_of``, ``info_of``): ``stream(request)`` yields ``TextDelta`` events and
    ends with one ``Completion`` (streaming needs ``n == 1``); ``health()`` returns a
    ``Health``; ``info()`` a ``BackendInfo``.
    """

    @property
    def name(self) -> str: ...

    async def generate(self, request: GenerationRequest) -> list[Completion]: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class BaseBackend:
    """Convenience base: a name, the async context manager around ``aclose``, and
    defaults for the optional methods (override them when the backend can do better).
    A subclass implements ``generate``."""

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

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        raise NotImplementedError(f"{type(self).__name__} does not implement generate")

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Default: ``generate`` then one ``Completion`` (no deltas)."""
        return _stream_by_generate(self, request)

    async def health(self) -> Health:
        """Default: nothing is known without a generation, so nothing is claimed."""
        return _unknown_health()

    async def info(self) -> BackendInfo:
        """Default: only the name and kind."""
        return BackendInfo(name=self.name, kind=self.kind)

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


def stream_of(backend: Backend, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
    """``backend.stream(request)``, or ``generate`` then one ``Completion`` without it."""
    own = getattr(backend, "stream", None)
    if own is not None:
        return cast("AsyncIterator[StreamEvent]", own(request))
    return _stream_by_generate(backend, request)


async def health_of(backend: Backend) -> Health:
    """``backend.health()``, or an ok ``Health`` that says it is unknown without it."""
    own = getattr(backend, "health", None)
    if own is not None:
        return cast(Health, await own())
    return _unknown_health()


async def info_of(backend: Backend) -> BackendInfo:
    """``backend.info()``, or just its name and kind without it."""
    own = getattr(backend, "info", None)
    if own is not None:
        return cast(BackendInfo, await own())
    return BackendInfo(name=backend.name, kind=kind_of(backend))


def kind_of(backend: Backend) -> str:
    """The backend's ``kind`` attribute, else its class name."""
    return str(getattr(backend, "kind", type(backend).__name__))


async def _stream_by_generate(
    backend: Backend, request: GenerationRequest
) -> AsyncIterator[StreamEvent]:
    if request.n != 1:
        raise ValueError(f"streaming needs n == 1, got n={request.n}")
    completions = await backend.generate(request)
    yield completions[0]


def _unknown_health() -> Health:
    return Health(ok=True, latency_s=0.0, detail="unknown (this backend has no health check)")


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
    return c if c.index == index else dataclasses.replace(c, index=index)
